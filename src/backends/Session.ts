/**
 * The session interpreter: runs a session graph in order. Plain nodes
 * (values, lists, tensor operations, applies, logs) run through the local
 * interpreter without a forward pass; `Trace` nodes run a forward pass with
 * their body interleaved, seeing every earlier session value; `Iter` runs its
 * body once per item; `Cond` picks a branch; `Stop` ends the innermost loop,
 * or the session at its top level.
 *
 * @example
 * import * as Session from "./Session.js"
 * const outcome = yield* Session.execute(runtime, graph, { prepare, functions })
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import * as Local from "./Local.js"
import * as Values from "./Values.js"

/**
 * What a session run needs from the model around it.
 *
 * @since 0.1.0
 */
export interface Options {
  /** Batches a trace's invoke inputs (the model's own tokenizing and padding). */
  readonly prepare: (inputs: ReadonlyArray<unknown>) => Effect.Effect<
    { readonly feeds: Readonly<Record<string, import("../core/Tensor.js").Tensor>>; readonly rows: ReadonlyArray<Local.Rows> },
    Errors.TraceError
  >
  readonly functions?: ReadonlyArray<(...args: ReadonlyArray<unknown>) => unknown>
  readonly log?: (...args: ReadonlyArray<unknown>) => void
}

type Flow = "next" | "break" | "end"

/**
 * Runs a session graph.
 *
 * @example
 * const outcome = yield* Session.execute(runtime, graph, { prepare })
 *
 * @since 0.1.0
 */
export const execute = (
  rt: Local.Runtime,
  graph: Graph.Graph,
  options: Options
): Effect.Effect<Local.Outcome, Errors.TraceError> =>
  Effect.gen(function*() {
    const env = new Map<number, Values.Val>()
    const noResult: Graph.Result = { _tag: "Value", value: null }

    /** Runs plain nodes (no forward pass), seeing and extending `env`. */
    const plain = (nodes: ReadonlyArray<Graph.Node>) =>
      Effect.gen(function*() {
        if (nodes.length === 0) return
        const run = yield* Local.start(rt, { nodes, invokes: 0, result: noResult }, [], {
          externals: env,
          keep: new Set(nodes.map((n) => n.id)),
          functions: options.functions,
          log: options.log
        })
        const outcome = yield* run.finish
        for (const [id, v] of outcome.values) env.set(id, v)
      })

    const block = (nodes: ReadonlyArray<Graph.Node>): Effect.Effect<Flow, Errors.TraceError> =>
      Effect.gen(function*() {
        let pending: Array<Graph.Node> = []
        const flush = Effect.suspend(() => {
          const batch = pending
          pending = []
          return plain(batch)
        })
        for (const node of nodes) {
          switch (node._tag) {
            case "Stop":
              yield* flush
              return "break"
            case "Cond": {
              yield* flush
              const p = env.get(node.predicate)
              if (p === undefined) {
                return yield* new Errors.Unavailable({ site: node.site, reason: "the condition's value was not computed" })
              }
              const flow = yield* block(Values.truthy(p) ? node.then : node.otherwise)
              if (flow !== "next") return flow
              break
            }
            case "Iter": {
              yield* flush
              const over = env.get(node.over)
              if (over === undefined) {
                return yield* new Errors.Unavailable({ site: node.site, reason: "the loop's items were not computed" })
              }
              const items = yield* Effect.try({
                try: () => Values.items(over),
                catch: (e) => new Errors.InvalidValue({ site: node.site, reason: e instanceof Error ? e.message : String(e) })
              })
              const bodyIds = Graph.flatten(node.body).map((n) => n.id)
              for (const item of items) {
                // each pass computes its body afresh
                for (const id of bodyIds) env.delete(id)
                env.set(node.id, item)
                const flow = yield* block(node.body)
                if (flow === "break") break
                if (flow === "end") return "end"
              }
              break
            }
            case "Trace": {
              yield* flush
              const inputs = node.inputs.map((i) => Values.toUser(env.get(i)!))
              const batch = yield* options.prepare(inputs)
              const run = yield* Local.start(rt, { nodes: node.body, invokes: inputs.length, result: noResult }, batch.rows, {
                externals: env,
                keep: new Set(Graph.flatten(node.body).map((n) => n.id)),
                functions: options.functions,
                log: options.log
              })
              yield* run.forward(batch.feeds, 0)
              const outcome = yield* run.finish
              for (const [id, v] of outcome.values) env.set(id, v)
              break
            }
            default:
              pending.push(node)
          }
        }
        yield* flush
        return "next"
      })

    const flow = yield* block(graph.nodes)
    void flow
    const values = new Map<number, Values.Val>()
    const unavailable = new Map<number, Errors.Unavailable>()
    const sites = new Map(Graph.flatten(graph.nodes).map((n) => [n.id, n.site]))
    for (const id of Graph.resultRefs(graph.result)) {
      const v = env.get(id)
      if (v !== undefined) values.set(id, v)
      else {
        unavailable.set(
          id,
          new Errors.Unavailable({ site: sites.get(id) ?? "", reason: "the session never computed it (a stop, an untaken branch, or an early-stopped trace)" })
        )
      }
    }
    return { values, unavailable }
  })
