/**
 * The local interpreter: runs a model on onnxruntime, cut into segments at
 * the hook points the intervention graph uses, and interleaves the graph with
 * the forward pass.
 *
 * - Segments: the model's canonical cuts (block borders) plus a cut wherever
 *   a value is set (a module output is set where the module ends; an input
 *   is replaced for the module's own range). Reads need no cut: a tensor read
 *   inside a segment becomes an extra output of it. Sessions are cached by
 *   segment, so a repeated trace of the same structure creates none.
 * - Events: after each segment, the hook points it passed fire in PyTorch's
 *   hook order (at one position: outputs innermost first, then inputs
 *   outermost first); after each, every node whose inputs are ready runs.
 *   A read sees the sets recorded before it on the same hook, not later ones.
 * - Invokes: each invoke's reads and sets address its own rows of the batch.
 * - Early stop: once a `Stop` node is reached (everything recorded before it
 *   has run), the remaining segments are skipped; values that needed them are
 *   reported unavailable.
 * - Memory: intermediate values are dropped once nothing needs them; only
 *   results are kept.
 *
 * @example
 * import * as Local from "./Local.js"
 * const outcome = yield* Local.execute(runtime, { graph, feeds, rows })
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import * as ort from "onnxruntime-node"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import * as Literal from "../core/Literal.js"
import * as Ops from "../core/Ops.js"
import { Tensor } from "../core/Tensor.js"
import type * as Loaded from "../models/Loaded.js"
import * as Onnx from "../models/Onnx.js"
import * as Segments from "../models/Segments.js"
import type * as Shapes from "../models/Shapes.js"
import * as Weights from "../models/Weights.js"
import * as Kernels from "./Kernels.js"
import * as Scan from "./Scan.js"
import * as Sessions from "./Sessions.js"
import * as Values from "./Values.js"
import * as Backprop from "./Backprop.js"

/**
 * A loaded model with its session cache.
 *
 * @since 0.1.0
 */
export interface Runtime {
  readonly loaded: Loaded.Loaded
  readonly sessions: Sessions.Cache
}

/**
 * Rows of the batch that belong to one invoke.
 *
 * @since 0.1.0
 */
export interface Rows {
  readonly start: number
  readonly count: number
}

/**
 * One execution: the graph, the batched model inputs, and each invoke's rows.
 *
 * @since 0.1.0
 */
export interface Request {
  readonly graph: Graph.Graph
  readonly feeds: Readonly<Record<string, Tensor>>
  readonly rows: ReadonlyArray<Rows>
  /** Local functions the graph's `Call` nodes use (absent remotely). */
  readonly functions?: ReadonlyArray<(...args: ReadonlyArray<never>) => unknown>
}

/**
 * What an execution gives: the value of every node the result refers to, or
 * why it is unavailable.
 *
 * @since 0.1.0
 */
export interface Outcome {
  readonly values: ReadonlyMap<number, Values.Val>
  readonly unavailable: ReadonlyMap<number, Errors.Unavailable>
}

type Scalar = number | boolean
type Val = Values.Val

/** Where and when a hook point fires. */
interface HookSite {
  readonly key: string
  readonly tensor: string
  readonly position: number
  /** Sort key among hooks at one position. */
  readonly order: number
  readonly start: number
  readonly end: number
  readonly point: "input" | "output"
}

const borders = new WeakMap<Loaded.Loaded, ReadonlySet<string>>()

/** Tensors crossing the canonical cuts (block inputs and outputs), graph inputs and outputs. */
const borderTensors = (loaded: Loaded.Loaded): ReadonlySet<string> => {
  let set = borders.get(loaded)
  if (set === undefined) {
    const n = loaded.tree.order.length
    const cuts = [0, ...loaded.canonicalCuts, n]
    const all = new Set<string>([...loaded.model.graph.inputs.map((v) => v.name), ...loaded.model.graph.outputs.map((v) => v.name)])
    for (let k = 0; k + 1 < cuts.length; k++) Segments.segment(loaded.index, cuts[k], cuts[k + 1]).outputs.forEach((t) => all.add(t))
    borders.set(loaded, (set = all))
  }
  return set
}

const plans = new WeakMap<Loaded.Loaded, Map<string, { readonly seg: Segments.Segment; readonly key: string }>>()

/** The segment `[start, end)` with extra outputs, planned once per model. */
const plan = (loaded: Loaded.Loaded, start: number, end: number, extra: ReadonlyArray<string>) => {
  let cache = plans.get(loaded)
  if (cache === undefined) plans.set(loaded, (cache = new Map()))
  const id = `${start}:${end}|${[...extra].sort().join(",")}`
  let entry = cache.get(id)
  if (entry === undefined) {
    const seg = Segments.segment(loaded.index, start, end, extra)
    entry = { seg, key: `seg:${start}:${end}|${[...seg.outputs].sort().join(",")}` }
    cache.set(id, entry)
  }
  return entry
}

/**
 * Write passes and their sessions. A pass that writes (or feeds a backward
 * pass) cuts the model where it writes (or where the backward chain cuts);
 * it runs on the canonical block segments (shared by every pattern, so a
 * sweep over many positions adds only small sessions). A pattern that makes
 * up most of the recent write passes (a loop, a benchmark, a generation's
 * steps) gets its own few sessions, cut only where it must: a chain of block
 * sessions pays each run's fixed overhead once per block (about 8% on a
 * GPT-2-small-sized model). One such pattern is kept per model, so its
 * memory is bounded by one more copy of the weights; only a pattern that
 * comes to dominate (three quarters of the recent write passes) replaces it,
 * and only once it is all but unused, so a mixed workload (a server's) never
 * trades sessions back and forth.
 */
interface WritePatterns {
  readonly recent: Array<string>
  coarse: string | undefined
  keys: Set<string>
}
/** How many recent write passes decide which pattern dominates. */
const recentPasses = 16
const writePatterns = new WeakMap<Sessions.Cache, WritePatterns>()

/**
 * Records a write pass of `pattern`; whether it runs on its own sessions
 * (`own` collects their keys). A pattern that takes over releases the
 * previous one's sessions.
 */
const ownSessions = (sessions: Sessions.Cache, pattern: string): WritePatterns | undefined => {
  let state = writePatterns.get(sessions)
  if (state === undefined) writePatterns.set(sessions, (state = { recent: [], coarse: undefined, keys: new Set() }))
  state.recent.push(pattern)
  if (state.recent.length > recentPasses) state.recent.shift()
  if (state.coarse === pattern) return state
  const count = state.recent.filter((p) => p === pattern).length
  const kept = state.recent.filter((p) => p === state.coarse).length
  // dominance: three quarters of the recent passes, and the kept pattern all but gone
  if (count < 2 || count * 4 < state.recent.length * 3 || kept > 1) return undefined
  sessions.drop(state.keys)
  state.keys = new Set()
  state.coarse = pattern
  return state
}

const hookKey = Scan.hookKey

const wrapOrt = (t: ort.Tensor): Tensor => {
  if (t.type === "bool" || t.type === "float16") return Tensor.fromOrt(t)
  return new Tensor(t.type as DType.DType, [...t.dims], t.data as DType.TypedData)
}

/** A hook reference resolved to its place in the linear order (see `Scan.hookCall`). */
const resolveHook = (
  loaded: Loaded.Loaded,
  ref: Graph.HookRef,
  at: { readonly site: string }
): Effect.Effect<HookSite & { readonly step: number }, Errors.UnknownModule | Errors.ModuleIndexOutOfRange> =>
  Effect.try({
    try: () => {
      const { call, tensor, step } = Scan.hookCall(loaded, ref, at)
      const depth = ref.module === "" ? 0 : ref.module.split(".").length
      // outputs before inputs; outputs innermost first, inputs outermost first
      const order = ref.point === "output" ? 1000 - depth : 2000 + depth
      const position = ref.point === "input" ? call.start : call.end
      return { key: hookKey(ref), tensor, position, order, start: call.start, end: call.end, point: ref.point, step }
    },
    catch: (e) => {
      if (e instanceof Errors.UnknownModule || e instanceof Errors.ModuleIndexOutOfRange) return e
      throw e
    }
  })

/**
 * The batch rows of an invoke, when the tensor is batched (its first
 * dimension is the batch size); the whole tensor otherwise.
 */
const narrow = (t: Tensor, rows: Rows | undefined, batch: number, invokes: number): Tensor => {
  // invoke -1 (a model edit) addresses every row
  if (rows === undefined || invokes <= 1 || t.shape.length === 0 || t.shape[0] !== batch) return t
  const rowSize = t.shape.slice(1).reduce((a, b) => a * b, 1)
  const data = t.data as DType.TypedData
  const part =
    Array.isArray(data) ? data.slice(rows.start * rowSize, (rows.start + rows.count) * rowSize)
    : (data as Exclude<DType.TypedData, Array<string>>).subarray(rows.start * rowSize, (rows.start + rows.count) * rowSize)
  return new Tensor(t.dtype, [rows.count, ...t.shape.slice(1)], part as DType.ArrayOf[DType.DType])
}

/** Broadcasts `value` into the rows of `base` (all of it when not batched). */
const replaceRows = (base: Tensor, value: Tensor, rows: Rows | undefined, batch: number, invokes: number): Tensor => {
  const whole = rows === undefined || invokes <= 1 || base.shape.length === 0 || base.shape[0] !== batch
  // fast paths: a scalar fills, a value of the target's own shape is copied in
  if (base.dtype !== "string" && base.dtype !== "float16") {
    const rowSize = base.shape.slice(1).reduce((a, b) => a * b, 1)
    const [from, count] = whole ? [0, base.size] : [rows!.start * rowSize, rows!.count * rowSize]
    const targetShape = whole ? base.shape : [rows!.count, ...base.shape.slice(1)]
    const v = value.dtype === base.dtype ? value : Kernels.castTo(value, base.dtype)
    const sameShape = v.shape.length === targetShape.length && v.shape.every((d, i) => d === targetShape[i])
    if (v.size === 1 || sameShape) {
      const data = (whole ? DType.arrayFor(base.dtype, base.size) : (base.data as Exclude<DType.TypedData, Array<string>>).slice()) as Exclude<
        DType.TypedData,
        Array<string>
      >
      const src = v.data as Exclude<DType.TypedData, Array<string>>
      if (v.size === 1) (data as unknown as { fill: (x: unknown, a: number, b: number) => void }).fill(src[0], from, from + count)
      else (data as unknown as { set: (x: unknown, o: number) => void }).set(src, from)
      return new Tensor<DType.DType>(base.dtype as DType.DType, base.shape, data as unknown as DType.ArrayOf[DType.DType])
    }
  }
  return Kernels.assign(base, whole ? [] : [`${rows.start}:${rows.start + rows.count}`], value)
}

/**
 * Runs a graph against a model: one forward pass.
 *
 * @example
 * const outcome = yield* Local.execute(runtime, request)
 *
 * @since 0.1.0
 */
export const execute = (rt: Runtime, req: Request): Effect.Effect<Outcome, Errors.TraceError> =>
  Effect.gen(function*() {
    const run = yield* start(rt, req.graph, req.rows, { functions: req.functions as Options["functions"] })
    yield* run.forward(req.feeds, 0)
    return yield* run.finish
  })

/**
 * A graph being run over one or several forward passes (generation steps).
 * Values flow across passes; a hook on call `c` of a module that runs `k`
 * times per pass fires in pass `floor(c / k)`.
 *
 * @since 0.1.0
 */
/**
 * What a run gets from around it: values of nodes outside its graph (a
 * session's), node ids to keep for later, local functions, a log sink.
 *
 * @since 0.1.0
 */
export interface Options {
  readonly externals?: ReadonlyMap<number, Values.Val>
  readonly keep?: ReadonlySet<number>
  readonly functions?: ReadonlyArray<(...args: ReadonlyArray<unknown>) => unknown>
  readonly log?: (...args: ReadonlyArray<unknown>) => void
}

export interface Run {
  /** Runs one forward pass; gives the model's outputs as the interventions left them. */
  readonly forward: (
    feeds: Readonly<Record<string, Tensor>>,
    step: number
  ) => Effect.Effect<ReadonlyMap<string, Tensor>, Errors.TraceError>
  /**
   * Whether the graph can still see this tensor after its pass: a hook or set
   * on it (any step), a module call's pinned input, or a backward pass. A
   * tensor no one holds may be freed by the caller once it has used it.
   */
  readonly held: (tensor: string) => boolean
  /** Whether a `Stop` node ended the run. */
  readonly stopped: () => boolean
  /** Gives the generated token ids (for `Generated` nodes), once generation ended. */
  readonly complete: (tokens: Tensor) => Effect.Effect<void, Errors.TraceError>
  /** Runs what is still runnable and gives the results. */
  readonly finish: Effect.Effect<Outcome, Errors.TraceError>
}

/**
 * Prepares a run of a graph: resolves every hook (typed errors for unknown
 * modules and out-of-range calls, inputs or outputs) before anything runs.
 *
 * @example
 * const run = yield* Local.start(runtime, graph, rows)
 * const outputs = yield* run.forward(feeds, 0)
 *
 * @since 0.1.0
 */
export const start = (
  rt: Runtime,
  graph: Graph.Graph,
  rows: ReadonlyArray<Rows>,
  options: Options = {}
): Effect.Effect<Run, Errors.TraceError> =>
  Effect.gen(function*() {
    const { loaded, sessions } = rt
    const idx = loaded.index
    const n = loaded.tree.order.length
    // nested bodies (conditions) are flattened; a node runs once its guard decided for its branch
    const nodes = Graph.flatten(graph.nodes)
    const byId = new Map(nodes.map((nd) => [nd.id, nd]))
    // an early stop or an ad-hoc module call needs the canonical cuts
    const stopsOrApplies = nodes.some((nd) => nd._tag === "Stop" || nd._tag === "Apply")
    const guard = new Map<number, { readonly cond: number; readonly branch: boolean }>()
    for (const nd of nodes) {
      if (nd._tag === "Cond") {
        for (const c of nd.then) guard.set(c.id, { cond: nd.id, branch: true })
        for (const c of nd.otherwise) guard.set(c.id, { cond: nd.id, branch: false })
      }
      if (nd._tag === "Iter" || nd._tag === "Trace") {
        return yield* new Errors.InvalidValue({
          site: nd.site,
          reason: nd._tag === "Iter" ? "a loop cannot run inside a forward pass: loop over traces in a session, or over steps with t.all / envoy.iter" : "a trace cannot run inside another trace"
        })
      }
    }
    const decisions = new Map<number, boolean>()
    const skipped = new Set<number>()
    const batch = rows.reduce((a, r) => a + r.count, 0)
    const invokes = rows.length
    const declared = new Map(loaded.model.graph.inputs.map((v) => [v.name, v]))
    const initializerNames = new Set(loaded.model.graph.initializers.map((t) => t.name))

    // -- hooks ---------------------------------------------------------------
    const hookSites = new Map<string, HookSite & { readonly step: number }>()
    const applyPins = new Set<string>()
    for (const node of nodes) {
      if (node._tag === "Hook" || node._tag === "Set") {
        const site = yield* resolveHook(loaded, node.ref, node)
        hookSites.set(site.key, site)
      }
      if (node._tag === "Apply") {
        const module = loaded.tree.modules.get(node.module)
        const call = module?.calls[node.call % Math.max(1, module?.calls.length ?? 1)]
        if (module === undefined || call === undefined) {
          return yield* new Errors.UnknownModule({ path: "", name: node.module, available: [], site: node.site })
        }
        call.inputs.slice(node.args.length).forEach((t) => applyPins.add(t))
      }
    }

    // a generation's `all()` makes hooks for every step: each pass looks up only its own
    const sitesByStep = new Map<number, Array<HookSite & { readonly step: number }>>()
    for (const site of hookSites.values()) {
      const list = sitesByStep.get(site.step)
      if (list === undefined) sitesByStep.set(site.step, [site])
      else list.push(site)
    }
    const setSites = nodes.flatMap((node) => (node._tag === "Set" ? [{ node, site: hookSites.get(hookKey(node.ref))! }] : []))

    // -- backward passes ------------------------------------------------------
    // each gradient read/set belongs to the first backward() recorded after it
    const backwards = nodes.filter((nd) => nd._tag === "Backward").map((nd) => nd.id).sort((a, b) => a - b)
    const boundTo = new Map<number, number>()
    const gradTarget = new Map<
      number,
      { readonly tensor?: string; readonly param?: { readonly init: string; readonly transposed: boolean }; readonly rows?: Rows; readonly value?: number }
    >()
    const backTensors = new Set<string>()
    const backParams = new Set<string>()
    // values made outside the forward pass (session variables, constants) whose gradients are read
    const valueGradIds = new Set<number>()
    for (const nd of nodes) {
      if (nd._tag !== "Grad" && nd._tag !== "SetGrad") continue
      const b = backwards.find((id) => id > nd.id)
      if (b === undefined) {
        return yield* new Errors.InvalidValue({ site: nd.site, reason: "a gradient is read or set, but no backward() is recorded after it" })
      }
      boundTo.set(nd.id, b)
      const of = byId.get(nd.of)
      if (of?._tag === "Hook") {
        const site = hookSites.get(hookKey(of.ref))!
        gradTarget.set(nd.id, { tensor: site.tensor, rows: rows[of.ref.invoke] })
        backTensors.add(site.tensor)
      } else if (of?._tag === "Param") {
        const module = loaded.tree.modules.get(of.module)
        const p = module?.parameters.find((q) => q.name === of.name)
        if (p === undefined) return yield* new Errors.UnknownModule({ path: of.module, name: of.name, available: [], site: of.site })
        gradTarget.set(nd.id, { param: { init: p.initializer, transposed: p.transposed } })
        backParams.add(p.initializer)
      } else if (nd._tag === "Grad" && (of === undefined || of._tag === "Constant" || of._tag === "Value")) {
        // a leaf value: an external (a session variable, an earlier trace's result) or a constant
        gradTarget.set(nd.id, { value: nd.of })
        valueGradIds.add(nd.of)
      } else {
        return yield* new Errors.InvalidValue({
          site: nd.site,
          reason: nd._tag === "SetGrad"
            ? "gradients can be set on module inputs and outputs and on parameters"
            : "gradients can be read on module inputs and outputs, on parameters, and on values made outside the forward pass (session variables, constants); read the gradient of the module value this one is computed from"
        })
      }
    }
    // the loss's ingredients stay until backward runs
    const keepForBackward = new Set<number>()
    const ancestors = (id: number) => {
      if (keepForBackward.has(id)) return
      keepForBackward.add(id)
      const nd = byId.get(id)
      if (nd !== undefined) Graph.dependencies(nd).forEach(ancestors)
    }
    for (const b of backwards) {
      const nd = byId.get(b)!
      if (nd._tag === "Backward") ancestors(nd.loss)
    }
    // the output sets a backward pass goes back through (later ones first): the
    // gradient of a set's value flows on to what the value is made of
    const backSets = backwards.length === 0 ? [] : nodes
      .filter((nd): nd is Graph.Node & { _tag: "Set" } => nd._tag === "Set" && hookSites.get(hookKey(nd.ref))!.point === "output")
      .sort((a, b) => b.id - a.id)
    for (const nd of backSets) {
      ancestors(nd.value)
      backTensors.add(hookSites.get(hookKey(nd.ref))!.tensor)
    }
    // the module values the loss and the sets read get their gradients at their own cuts
    for (const id of keepForBackward) {
      const nd = byId.get(id)
      if (nd?._tag === "Hook") backTensors.add(hookSites.get(hookKey(nd.ref))!.tensor)
    }
    const backBorders = backwards.length > 0 ? Backprop.cuts(loaded, backTensors) : []
    const backForward = new Set<string>()
    if (backwards.length > 0) {
      const planned = yield* Effect.try({
        try: () => Backprop.neededForward(loaded, backBorders, backParams),
        catch: (e) => new Errors.InvalidValue({ site: byId.get(backwards[0])!.site, reason: `cannot differentiate this model: ${e instanceof Error ? e.message : String(e)}` })
      })
      planned.forEach((t) => backForward.add(t))
      for (let k = 0; k + 1 < backBorders.length; k++) {
        Segments.segment(idx, backBorders[k], backBorders[k + 1]).outputs.forEach((t) => backForward.add(t))
      }
    }
    let forwardDone = false
    let inBackward = false
    const appliedGrads = new Set<number>()
    // the values that sets replaced, which the backward of their producers needs
    const originals = new Map<string, Tensor>()

    // -- node bookkeeping ----------------------------------------------------
    const values = new Map<number, Val>(options.externals ?? [])
    const done = new Set<number>(options.externals?.keys() ?? [])
    const uses = new Map<number, number>()
    const resultIds = new Set([...Graph.resultRefs(graph.result), ...(options.keep ?? []), ...keepForBackward])
    // variables given new values: the new values go back to the caller (a session)
    // and, in recording order, readers wait for earlier assignments and assignments for earlier readers
    const after = new Map<number, Array<number>>()
    const targets = new Set(nodes.flatMap((nd) => (nd._tag === "Assign" ? [nd.target] : [])))
    if (targets.size > 0) {
      const readers = new Map<number, Array<number>>()
      const lastAssign = new Map<number, number>()
      const push = <K>(m: Map<K, Array<number>>, k: K, v: number) => (m.get(k) ?? m.set(k, []).get(k)!).push(v)
      for (const nd of nodes) {
        for (const d of Graph.dependencies(nd)) {
          if (!targets.has(d)) continue
          const a = lastAssign.get(d)
          if (a !== undefined && a !== nd.id) push(after, nd.id, a)
          if (nd._tag !== "Assign" || nd.target !== d) push(readers, d, nd.id)
        }
        if (nd._tag === "Assign") {
          for (const r of readers.get(nd.target) ?? []) if (r !== nd.id) push(after, nd.id, r)
          readers.set(nd.target, [])
          lastAssign.set(nd.target, nd.id)
          resultIds.add(nd.target)
        }
      }
    }
    for (const node of nodes) for (const d of Graph.dependencies(node)) uses.set(d, (uses.get(d) ?? 0) + 1)
    const snapshots = new Map<string, Tensor>()
    const hookUsers = new Map<string, number>()
    for (const node of nodes) {
      if (node._tag === "Hook" || node._tag === "Set") hookUsers.set(hookKey(node.ref), (hookUsers.get(hookKey(node.ref)) ?? 0) + 1)
    }
    // a read waits for the sets recorded before it on the same hook
    const setsBefore = new Map<number, ReadonlyArray<number>>()
    const setsSoFar = new Map<string, Array<number>>()
    for (const node of nodes) {
      if (node._tag === "Hook") setsBefore.set(node.id, [...(setsSoFar.get(hookKey(node.ref)) ?? [])])
      if (node._tag === "Set") {
        const key = hookKey(node.ref)
        setsSoFar.set(key, [...(setsSoFar.get(key) ?? []), node.id])
      }
    }
    let stopped: Graph.Node | undefined
    let generated: Tensor | undefined
    // state of the current forward pass
    let env = new Map<string, Tensor>()
    let overrides: Array<{ start: number; end: number; tensor: string; value: Tensor }> = []

    const release = (id: number) => {
      const left = (uses.get(id) ?? 0) - 1
      uses.set(id, left)
      if (left <= 0 && !resultIds.has(id) && !options.externals?.has(id)) values.delete(id)
    }
    const hookDone = (ref: Graph.HookRef) => {
      const key = hookKey(ref)
      const left = (hookUsers.get(key) ?? 1) - 1
      hookUsers.set(key, left)
      if (left <= 0) snapshots.delete(key)
    }
    const asTensor = (v: Val): Tensor => {
      if (v instanceof Tensor) return v
      if (Array.isArray(v)) return (v as ReadonlyArray<Tensor>)[0]
      return typeof v === "boolean" ? new Tensor("bool", [], Uint8Array.of(v ? 1 : 0)) : new Tensor("float32", [], Float32Array.of(v as number))
    }
    const fail = (site: string, e: unknown): Errors.TraceError => {
      if (Errors.isTraceError(e)) return e
      if (e instanceof Sessions.OrtError) return new Errors.ExecutionError({ site, reason: e.message })
      const message = e instanceof Error ? e.message : String(e)
      return new Errors.InvalidValue({ site, reason: message })
    }

    const operands = (node: Graph.Node & { _tag: "Op" }): ReadonlyArray<Tensor> => {
      const raw = node.args.map((a) => values.get(a)!)
      const tensorArgs = raw.filter((v): v is Tensor => v instanceof Tensor)
      const dtypeArgs = node.op === "Where" ? tensorArgs.filter((_, k) => !(raw[0] instanceof Tensor && k === 0)) : tensorArgs
      const target = dtypeArgs.length > 0 ? Kernels.promote(dtypeArgs.map((t) => t.dtype)) : undefined
      return raw.map((v, k) => {
        if (node.op === "Where" && k === 0) return v instanceof Tensor ? Kernels.castTo(v, "bool") : asTensor(v)
        if (Array.isArray(v)) return (v as ReadonlyArray<Tensor>)[0]
        if (v instanceof Tensor) return Ops.broadcasting.has(node.op) || node.op === "MatMul" || node.op === "Concat" ? Kernels.castTo(v, target ?? v.dtype) : v
        const scalar = v as Scalar
        const dtype = target ?? (typeof scalar === "boolean" ? "bool" : "float32")
        return Kernels.castTo(asTensor(scalar), dtype)
      })
    }

    const param = (node: Graph.Node & { _tag: "Param" }): Tensor => {
      const module = loaded.tree.modules.get(node.module)
      const p = module?.parameters.find((q) => q.name === node.name)
      const init = p && loaded.model.graph.initializers.find((t) => t.name === p.initializer)
      if (p === undefined || init === undefined) {
        throw new Errors.UnknownModule({ path: node.module, name: node.name, available: module?.parameters.map((q) => q.name) ?? [], site: node.site })
      }
      const dtype = DType.fromOnnx(init.dataType)!
      const t = new Tensor(dtype, init.dims.map(Number), Weights.tensorData(init) as DType.ArrayOf[DType.DType])
      return p.transposed ? Kernels.transpose2d(t) : t
    }

    const applyModule = (node: Graph.Node & { _tag: "Apply" }) =>
      Effect.gen(function*() {
        const module = loaded.tree.modules.get(node.module)!
        const call = module.calls[node.call % module.calls.length]
        const seg0 = Segments.segment(idx, call.start, call.end)
        const seg: Segments.Segment = { ...seg0, outputs: [call.outputs[0]] }
        const session = yield* sessions.get(`apply:${call.start}:${call.end}:${call.outputs[0]}`, () =>
          Onnx.encode(Weights.inline(Segments.toModel(idx, seg, { anyShape: true })))
        )
        const feeds: Record<string, ort.Tensor> = {}
        for (const name of seg.inputs) {
          const k = call.inputs.indexOf(name)
          let t: Tensor | undefined
          if (k >= 0 && k < node.args.length) {
            const want = DType.fromOnnx(idx.types.get(name) ?? 0)
            const v = asTensor(values.get(node.args[k])!)
            t = want !== undefined ? Kernels.castTo(v, want) : v
          } else t = env.get(name)
          if (t === undefined) {
            return yield* new Errors.InvalidValue({
              site: node.site,
              reason: `${node.module}.call() needs its input "${name}", which is not available here; pass it as an argument`
            })
          }
          feeds[name] = t.toOrt()
        }
        const out = yield* Sessions.run(session, feeds, seg.outputs)
        return wrapOrt(out[seg.outputs[0]])
      })

    /** Runs one node if it is ready; returns whether it ran. */
    const step = (node: Graph.Node): Effect.Effect<boolean, Errors.TraceError> =>
      Effect.gen(function*() {
        const ready = (ids: ReadonlyArray<number>) => ids.every((d) => done.has(d) && values.has(d))
        switch (node._tag) {
          case "Constant":
            values.set(node.id, Literal.toTensor(node.value))
            return true
          case "Scalar":
            values.set(node.id, node.value)
            return true
          case "Param":
            values.set(node.id, yield* Effect.try({ try: () => param(node), catch: (e) => fail(node.site, e) }))
            return true
          case "Hook": {
            const snap = snapshots.get(hookKey(node.ref))
            if (snap === undefined || !setsBefore.get(node.id)!.every((s) => done.has(s))) return false
            values.set(node.id, narrow(snap, rows[node.ref.invoke], batch, invokes))
            hookDone(node.ref)
            return true
          }
          case "Set": {
            const key = hookKey(node.ref)
            const snap = snapshots.get(key)
            if (snap === undefined || !ready([node.value])) return false
            const site = hookSites.get(key)!
            const value = asTensor(values.get(node.value)!)
            const replaced = yield* Effect.try({
              try: () => replaceRows(snap, value, rows[node.ref.invoke], batch, invokes),
              catch: (e) =>
                new Errors.InvalidValue({
                  site: node.site,
                  reason: `cannot set ${node.ref.module || "the model"}.${node.ref.point}: ${e instanceof Error ? e.message : String(e)}`
                })
            })
            snapshots.set(key, replaced)
            if (backSets.length > 0 && site.point === "output" && !originals.has(site.tensor)) originals.set(site.tensor, snap)
            if (site.point === "output") env.set(site.tensor, replaced)
            else overrides.push({ start: site.start, end: site.end, tensor: site.tensor, value: replaced })
            release(node.value)
            hookDone(node.ref)
            return true
          }
          case "Op": {
            if (!ready(node.args)) return false
            if (node.op === "Select") {
              // picks one output of a multi-output op (TopK's values or indices)
              const tuple = values.get(node.args[0])
              values.set(node.id, Array.isArray(tuple) ? (tuple as ReadonlyArray<Tensor>)[node.attrs.index as number] : tuple!)
              node.args.forEach(release)
              return true
            }
            const args = yield* Effect.try({ try: () => operands(node), catch: (e) => fail(node.site, e) })
            const out = yield* Kernels.run(sessions, node.op, args, node.attrs).pipe(
              Effect.mapError((e) => fail(node.site, e))
            )
            values.set(node.id, out)
            node.args.forEach(release)
            return true
          }
          case "Apply": {
            if (!ready(node.args)) return false
            values.set(node.id, yield* applyModule(node).pipe(Effect.mapError((e) => fail(node.site, e))))
            node.args.forEach(release)
            return true
          }
          case "Stop": {
            for (const other of nodes) if (other.id < node.id && !done.has(other.id)) return false
            stopped = node
            return true
          }
          case "Value":
            values.set(node.id, Values.fromJson(node.value))
            return true
          case "ListNew":
            if (!ready(node.items)) return false
            values.set(node.id, new Values.List(node.items.map((i) => values.get(i)!)))
            node.items.forEach(release)
            return true
          case "DictNew":
            values.set(node.id, new Values.Dict())
            return true
          case "Append": {
            if (!ready([node.target, node.value])) return false
            const target = values.get(node.target)
            const value = values.get(node.value)!
            if (target instanceof Values.List && node.key === null) target.items.push(value)
            else if (target instanceof Values.Dict && node.key !== null) target.entries.set(node.key, value)
            else return yield* new Errors.InvalidValue({ site: node.site, reason: node.key === null ? "append needs a list" : "setting a key needs a dict" })
            values.set(node.id, true)
            release(node.value)
            return true
          }
          case "Assign": {
            if (!ready([node.target, node.value])) return false
            values.set(node.target, values.get(node.value)!)
            values.set(node.id, true)
            release(node.value)
            return true
          }
          case "Call": {
            if (!ready(node.args)) return false
            const fn = options.functions?.[node.fn]
            if (fn === undefined) {
              return yield* new Errors.InvalidValue({ site: node.site, reason: "this graph calls a local function that is not available here" })
            }
            const out = yield* Effect.try({
              try: () => Values.fromUser(fn(...node.args.map((a) => Values.toUser(values.get(a)!)))),
              catch: (e) => fail(node.site, e)
            })
            values.set(node.id, out)
            node.args.forEach(release)
            return true
          }
          case "Log": {
            if (!ready(node.args)) return false
            ;(options.log ?? console.log)(...node.args.map((a) => Values.toUser(values.get(a)!)))
            values.set(node.id, true)
            node.args.forEach(release)
            return true
          }
          case "Cond": {
            if (!ready([node.predicate])) return false
            decisions.set(node.id, Values.truthy(values.get(node.predicate)!))
            values.set(node.id, decisions.get(node.id)!)
            release(node.predicate)
            return true
          }
          case "Grad":
            return values.has(node.id)
          case "SetGrad":
            return appliedGrads.has(node.id)
          case "Backward": {
            if (!forwardDone || inBackward || !ready([node.loss])) return false
            inBackward = true
            try {
              yield* runBackward(node)
            } finally {
              inBackward = false
            }
            values.set(node.id, true)
            return true
          }
          case "Iter":
          case "Trace":
            return false
          case "Generated": {
            if (generated === undefined) return false
            values.set(node.id, narrow(generated, rows[node.invoke], batch, invokes))
            return true
          }
        }
      })

    const zerosLike = (t: Tensor): Tensor => new Tensor(t.dtype, t.shape, DType.arrayFor(t.dtype, t.size) as DType.ArrayOf[DType.DType])
    const addInto = <K>(acc: Map<K, Tensor>, name: K, g: Tensor) => {
      const prev = acc.get(name)
      if (prev === undefined) {
        acc.set(name, g)
        return
      }
      const a = prev.data as Float32Array
      const b = g.data as Float32Array
      const sum = new Float32Array(a.length)
      for (let i = 0; i < a.length; i++) sum[i] = a[i] + b[i]
      acc.set(name, new Tensor(prev.dtype, prev.shape, sum as DType.ArrayOf[DType.DType]))
    }
    const forwardTensor = (name: string): Tensor | undefined => env.get(name)

    const runBackward = (node: Graph.Node & { _tag: "Backward" }): Effect.Effect<void, Errors.TraceError> =>
      Effect.gen(function*() {
        const bound = nodes.filter((nd) => boundTo.get(nd.id) === node.id).sort((a, b) => a.id - b.id)
        const gradAcc = new Map<string, Tensor>()
        const paramAcc = new Map<string, Tensor>()
        const valueAcc = new Map<number, Tensor>()
        const valueOf = (id: number) => {
          const v = values.get(id)
          return v instanceof Tensor || typeof v === "number" || typeof v === "boolean" ? v : undefined
        }
        const isLeaf = (nd: Graph.Node) => nd._tag === "Hook" || nd._tag === "Param" || valueGradIds.has(nd.id)
        /** Hands gradients of intervention leaves on: to module values, parameters, read values. */
        const distribute = (grads: ReadonlyMap<number, Tensor>) => {
          for (const [id, g] of grads) {
            if (valueGradIds.has(id)) {
              addInto(valueAcc, id, g)
              continue
            }
            const hook = byId.get(id)
            if (hook?._tag === "Param") {
              // a parameter the interventions read directly
              const module = loaded.tree.modules.get(hook.module)
              const p = module?.parameters.find((q) => q.name === hook.name)
              if (p !== undefined) addInto(paramAcc, p.initializer, p.transposed ? Kernels.transpose2d(g) : g)
              continue
            }
            if (hook?._tag !== "Hook") continue
            const site = hookSites.get(hookKey(hook.ref))!
            const whole = forwardTensor(site.tensor) ?? snapshots.get(site.key)
            if (whole === undefined) continue
            addInto(gradAcc, site.tensor, replaceRows(zerosLike(whole), g, rows[hook.ref.invoke], batch, invokes))
          }
        }
        // 1. through the interventions that built the loss, to the module values it read
        distribute(yield* Backprop.lossGradients(sessions, byId, node.loss, valueOf, isLeaf))
        /** Through the sets at a cut: the gradient of a set's rows goes to what its value is made of. */
        const throughSets = (border: number) =>
          Effect.gen(function*() {
            for (const set of backSets) {
              const site = hookSites.get(hookKey(set.ref))!
              if (Backprop.cutAfter(loaded, site.tensor) !== border) continue
              const g = gradAcc.get(site.tensor)
              const value = values.get(set.value)
              if (g === undefined || !(value instanceof Tensor || typeof value === "number" || typeof value === "boolean")) continue
              const r = rows[set.ref.invoke]
              const part = narrow(g, r, batch, invokes)
              gradAcc.set(site.tensor, replaceRows(g, zerosLike(part), r, batch, invokes))
              if (!(value instanceof Tensor) || !DType.isFloat(value.dtype)) continue
              const seed = yield* Effect.try({
                try: () => Kernels.sumTo(part, value.shape),
                catch: (e) => fail(set.site, e)
              })
              distribute(yield* Backprop.expressionGradients(sessions, byId, set.value, Kernels.castTo(seed, value.dtype), valueOf, isLeaf))
            }
          })
        // 2. through the model, segment by segment from its end
        const fire = (border: number) =>
          Effect.gen(function*() {
            for (const nd of bound) {
              const target = gradTarget.get(nd.id)!
              if (target.tensor === undefined) continue
              if (Backprop.cutAfter(loaded, target.tensor) !== border) continue
              const whole = forwardTensor(target.tensor)
              const current = gradAcc.get(target.tensor) ?? (whole ? zerosLike(whole) : undefined)
              if (current === undefined) continue
              if (nd._tag === "Grad") {
                values.set(nd.id, narrow(current, target.rows, batch, invokes))
                yield* runReady
              } else if (nd._tag === "SetGrad") {
                yield* runReady
                const v = values.get(nd.value)
                if (v === undefined) {
                  return yield* new Errors.OutOfOrder({ site: nd.site, reason: "the new gradient needs a value that backward computes only later" })
                }
                const replaced = yield* Effect.try({
                  try: () => replaceRows(current, asTensor(v), target.rows, batch, invokes),
                  catch: (e) => new Errors.InvalidValue({ site: nd.site, reason: `cannot set this gradient: ${e instanceof Error ? e.message : String(e)}` })
                })
                gradAcc.set(target.tensor, replaced)
                appliedGrads.add(nd.id)
                yield* runReady
              }
            }
            yield* throughSets(border)
          })
        // tensors the model's last node makes are complete at once
        yield* fire(backBorders[backBorders.length - 1])
        for (let k = backBorders.length - 2; k >= 0; k--) {
          const [start, end] = [backBorders[k], backBorders[k + 1]]
          const outputs = Segments.segment(idx, start, end).outputs
          const s = Backprop.step(loaded, start, end, new Set(outputs), backParams)
          if (s !== undefined && s.outputs.some((o) => gradAcc.has(o))) {
            const seeds = new Map<string, Tensor>()
            for (const o of s.outputs) {
              const g = gradAcc.get(o) ?? (forwardTensor(o) && zerosLike(forwardTensor(o)!))
              if (g === undefined) return yield* new Errors.ExecutionError({ site: node.site, reason: `internal: no forward value of "${o}" for backward` })
              seeds.set(o, g)
            }
            // a set tensor is its producer's output here: the producer's backward needs the value it made
            const produced = new Set(s.outputs)
            const grads = yield* Backprop.runStep(sessions, s, seeds, (name) => (produced.has(name) ? originals.get(name) : undefined) ?? forwardTensor(name))
            for (const [w, g] of grads) addInto(backParams.has(w) ? paramAcc : gradAcc, w, g)
          }
          yield* fire(start)
        }
        // parameters
        for (const nd of bound) {
          const target = gradTarget.get(nd.id)!
          if (target.tensor !== undefined && nd._tag === "Grad" && !values.has(nd.id) && !done.has(nd.id)) {
            return yield* new Errors.Unavailable({ site: nd.site, reason: "backward() never reached this value (it does not lead to the loss)" })
          }
        }
        for (const nd of bound) {
          const target = gradTarget.get(nd.id)!
          if (target.value === undefined || nd._tag !== "Grad") continue
          const v = values.get(target.value)
          const g = valueAcc.get(target.value)
          values.set(nd.id, g ?? (v instanceof Tensor ? zerosLike(v) : 0))
        }
        for (const nd of bound) {
          const target = gradTarget.get(nd.id)!
          if (target.param === undefined || nd._tag !== "Grad") continue
          const init = loaded.model.graph.initializers.find((t) => t.name === target.param!.init)!
          const dtype = DType.fromOnnx(init.dataType)!
          const g = paramAcc.get(target.param.init) ?? new Tensor(dtype, init.dims.map(Number), DType.arrayFor(dtype, init.dims.map(Number).reduce((a, b) => a * b, 1)) as DType.ArrayOf[DType.DType])
          values.set(nd.id, target.param.transposed ? Kernels.transpose2d(g) : g)
        }
        yield* runReady
      })

    /** A cheap check that `step` might run the node now (it rechecks). */
    const has = (d: number) => done.has(d) && values.has(d)
    const allHave = (ids: ReadonlyArray<number>) => {
      for (let k = 0; k < ids.length; k++) if (!has(ids[k])) return false
      return true
    }
    const allDone = (ids: ReadonlyArray<number>) => {
      for (let k = 0; k < ids.length; k++) if (!done.has(ids[k])) return false
      return true
    }
    const keys = new Map<number, string>()
    for (const nd of nodes) if (nd._tag === "Hook" || nd._tag === "Set") keys.set(nd.id, hookKey(nd.ref))
    const mayRun = (node: Graph.Node): boolean => {
      const waits = after.get(node.id)
      if (waits !== undefined && !allDone(waits)) return false
      switch (node._tag) {
        case "Hook":
          return snapshots.has(keys.get(node.id)!) && allDone(setsBefore.get(node.id)!)
        case "Set":
          return snapshots.has(keys.get(node.id)!) && has(node.value)
        case "Op":
        case "Apply":
        case "Call":
        case "Log":
          return allHave(node.args)
        case "Grad":
          return values.has(node.id)
        case "SetGrad":
          return appliedGrads.has(node.id)
        case "Generated":
          return generated !== undefined
        case "Backward":
          return forwardDone && !inBackward && has(node.loss)
        default:
          return true
      }
    }

    const pending = new Set(nodes.map((nd) => nd.id).filter((id) => !done.has(id)))
    // hooks of later passes cannot run yet, nor what is computed from them: they
    // wait aside, so a long generation does not rescan every step's nodes at every event
    const passOf = new Map<number, number>()
    for (const nd of nodes) {
      let p = nd._tag === "Hook" || nd._tag === "Set" ? hookSites.get(hookKey(nd.ref))!.step : 0
      for (const d of Graph.dependencies(nd)) p = Math.max(p, passOf.get(d) ?? 0)
      for (const d of after.get(nd.id) ?? []) p = Math.max(p, passOf.get(d) ?? 0)
      if (p > 0) passOf.set(nd.id, p)
    }
    let currentPass = 0
    const later = new Map<number, Array<number>>()
    const active = new Set<number>()
    for (const id of pending) {
      const p = passOf.get(id)
      if (p !== undefined && p > 0) {
        let list = later.get(p)
        if (list === undefined) later.set(p, (list = []))
        list.push(id)
      } else active.add(id)
    }
    const enterPass = (step: number) => {
      for (let p = currentPass + 1; p <= step; p++) for (const id of later.get(p) ?? []) if (pending.has(id)) active.add(id)
      currentPass = Math.max(currentPass, step)
    }
    const runReady = Effect.gen(function*() {
      let progress = true
      while (progress && stopped === undefined) {
        progress = false
        for (const id of active) {
          if (!pending.has(id)) {
            active.delete(id)
            continue
          }
          if (stopped !== undefined) break
          const node = byId.get(id)!
          const g = guard.get(id)
          let state: "run" | "wait" | "dead" = "run"
          if (g !== undefined) {
            const d = decisions.get(g.cond)
            state = skipped.has(g.cond) ? "dead" : d === undefined ? "wait" : d === g.branch ? "run" : "dead"
          }
          if (state === "wait" || (state === "run" && skipped.size === 0 && !mayRun(node))) continue
          if (state === "dead" || (skipped.size > 0 && Graph.dependencies(node).some((d) => skipped.has(d)))) {
            // an untaken branch, or a value that needs one: never runs
            skipped.add(id)
            pending.delete(id)
            done.add(id)
            if (node._tag === "Hook" || node._tag === "Set") hookDone(node.ref)
            progress = true
            continue
          }
          if (!mayRun(node)) continue
          if (yield* step(node)) {
            pending.delete(id)
            done.add(id)
            if ((uses.get(id) ?? 0) <= 0 && !resultIds.has(id)) values.delete(id)
            progress = true
          }
        }
      }
    })

    /**
     * The tensors this pass's sets replace, when every set can be fed: an output
     * point, every row, a value known now, a tensor the graph computes and reads
     * only by name in its main body, and a shape the scan knows.
     */
    const fedWrites = (
      sets: ReadonlyArray<{ readonly node: Graph.Node & { readonly _tag: "Set" }; readonly site: HookSite }>,
      feeds: Readonly<Record<string, Tensor>>
    ): ReadonlyMap<string, Tensor> | undefined => {
      // every set is checked before any value is made: one that cannot be fed means none is
      const tensors = new Set<string>()
      for (const { node, site } of sets) {
        const r = rows[node.ref.invoke]
        if (site.point !== "output" || tensors.has(site.tensor) || idx.graphOutputs.has(site.tensor) || !idx.producer.has(site.tensor)) return undefined
        if (invokes > 1 && !(r !== undefined && r.start === 0 && r.count === batch)) return undefined
        if (guard.has(node.id) || !(done.has(node.value) && values.has(node.value))) return undefined
        const value = values.get(node.value)
        if (!(value instanceof Tensor || typeof value === "number" || typeof value === "boolean")) return undefined
        tensors.add(site.tensor)
      }
      if (tensors.size === 0 || [...tensors].some((t) => idx.subgraphReads.has(t))) return undefined
      let shapes: ReadonlyMap<string, Shapes.Fake>
      try {
        shapes = Scan.forward(loaded, feeds)
      } catch {
        return undefined
      }
      const out = new Map<string, Tensor>()
      for (const { node, site } of sets) {
        const fake = shapes.get(site.tensor)
        if (fake === undefined || !fake.shape.every((d) => typeof d === "number")) return undefined
        try {
          out.set(site.tensor, replaceRows(Tensor.zeros(fake.shape as ReadonlyArray<number>, fake.dtype), asTensor(values.get(node.value)!), rows[node.ref.invoke], batch, invokes))
        } catch {
          // the set itself reports its error, with the user's line, when it runs
          return undefined
        }
      }
      return out
    }

    const forward = (feeds: Readonly<Record<string, Tensor>>, stepIndex: number) =>
      Effect.gen(function*() {
        env = new Map()
        overrides = []
        for (const [name, t] of Object.entries(feeds)) {
          const v = declared.get(name)
          if (v === undefined) {
            return yield* new Errors.InvalidInput({
              site: "",
              reason: `the model has no input "${name}"; its inputs are ${[...declared.keys()].join(", ")}`
            })
          }
          const want = DType.fromOnnx(Onnx.tensorType(v)?.elemType ?? 0)
          env.set(name, want !== undefined && want !== t.dtype ? Kernels.castTo(t, want) : t)
        }
        const missing = loaded.model.graph.inputs.filter((v) => !env.has(v.name) && !initializerNames.has(v.name))
        if (missing.length > 0) {
          return yield* new Errors.InvalidInput({ site: "", reason: `missing model inputs: ${missing.map((v) => v.name).join(", ")}` })
        }

        enterPass(stepIndex)
        // nodes that need nothing from this pass run first: a set's value known now can be fed
        yield* runReady
        // cuts and events of this pass
        const cuts = new Set(loaded.canonicalCuts)
        const here = [...(sitesByStep.get(stepIndex) ?? [])]
        const sets: Array<{ readonly node: Graph.Node & { readonly _tag: "Set" }; readonly site: HookSite }> = []
        const writeCuts = new Set<number>()
        for (const { node, site } of setSites) {
          if (!pending.has(node.id) || site.step !== stepIndex) continue
          sets.push({ node, site })
          for (const p of site.point === "input" ? [site.position, site.end] : [site.position]) {
            cuts.add(p)
            if (p > 0 && p < n) writeCuts.add(p)
          }
        }
        const events = here.sort((a, b) => a.position - b.position || a.order - b.order)
        const readTensors = new Set([...events.map((e) => e.tensor), ...backForward])
        // sets whose values are known before the pass and replace a tensor on every row (a
        // zero or mean ablation, a patch from an earlier trace) are fed to one session in the
        // tensor's place: no cut, so onnxruntime keeps its fusions and runs once. Only on a
        // first pass: the fed tensor's shape comes from a scan, which the trace's recording
        // already made for these inputs; a generation's later steps have new shapes each
        const writes = sets.length > 0
        const fed = stepIndex === 0 && writes && backForward.size === 0 && !stopsOrApplies && stopped === undefined ? fedWrites(sets, feeds) : undefined
        const fedTensors = fed === undefined ? [] : [...fed.keys()].sort()
        // a pass that only reads block borders runs as one session: onnxruntime keeps
        // its fusions across blocks, and one run costs less than a chain of them
        const whole =
          !writes &&
          backForward.size === 0 &&
          !stopsOrApplies &&
          [...readTensors].every((t) => borderTensors(loaded).has(t))
        // a write pattern that dominates runs cut only where it writes (see WritePatterns)
        let own: WritePatterns | undefined
        if ((writes || backForward.size > 0) && !stopsOrApplies && fed === undefined) {
          // a pass for backward also cuts where the backward chain does
          backBorders.forEach((p) => p > 0 && p < n && writeCuts.add(p))
          own = ownSessions(sessions, `${[...writeCuts].sort((a, b) => a - b).join(",")}|${[...readTensors].sort().join(",")}`)
          if (own !== undefined) {
            cuts.clear()
            writeCuts.forEach((p) => cuts.add(p))
          }
        }
        const bounds = whole || fed !== undefined ? [0, n] : [...new Set([0, n, ...[...cuts].filter((p) => p > 0 && p < n)])].sort((a, b) => a - b)
        const pins = new Set([...applyPins, ...readTensors])

        const valueAt = (tensor: string, site: HookSite): Tensor | undefined => {
          for (let k = overrides.length - 1; k >= 0; k--) {
            const o = overrides[k]
            if (o.tensor === tensor && site.position >= o.start && site.position < o.end) return o.value
          }
          return env.get(tensor)
        }
        let nextEvent = 0
        const fireUpTo = (pos: number) =>
          Effect.gen(function*() {
            while (nextEvent < events.length && events[nextEvent].position <= pos && stopped === undefined) {
              const e = events[nextEvent++]
              const t = valueAt(e.tensor, e)
              if (t !== undefined) snapshots.set(e.key, t)
              // with no sets in this pass, the order of reads does not matter: run once
              if (!whole || nextEvent === events.length || events[nextEvent].position > pos) yield* runReady
            }
            // a set at this point must have been applied before the forward goes on
            for (const { node, site } of setSites) {
              if (!pending.has(node.id) || stopped !== undefined) continue
              if (site.step === stepIndex && site.position <= pos && snapshots.has(site.key)) {
                return yield* new Errors.OutOfOrder({
                  site: node.site,
                  reason: `this set on ${node.ref.module || "the model"}.${node.ref.point} needs a value that is only computed later in the forward pass`
                })
              }
            }
          })

        yield* fireUpTo(0)
        for (let k = 0; k + 1 < bounds.length && stopped === undefined; k++) {
          const [segStart, segEnd] = [bounds[k], bounds[k + 1]]
          const extra = [...readTensors].filter((t) => {
            const p = idx.producer.get(t)
            return p !== undefined && idx.position[p] >= segStart && idx.position[p] < segEnd
          })
          const planned = plan(loaded, segStart, segEnd, extra)
          const { seg } = planned
          const key = fedTensors.length === 0 ? planned.key : `${planned.key}|fed:${fedTensors.join(",")}`
          // canonical segments and the whole model stay; a coarse pattern's own ranges go with it
          const at = loaded.canonicalCuts.indexOf(segStart)
          if (own !== undefined && !(at >= 0 && loaded.canonicalCuts[at + 1] === segEnd) && !(segStart === 0 && segEnd === n)) own.keys.add(key)
          const segFeeds: Record<string, ort.Tensor> = {}
          for (const [t, v] of fed ?? []) segFeeds[Segments.fedName(t)] = v.toOrt()
          for (const name of seg.inputs) {
            let t = env.get(name)
            for (const o of overrides) if (o.tensor === name && segStart >= o.start && segEnd <= o.end) t = o.value
            if (t === undefined) {
              return yield* new Errors.ExecutionError({ site: "", reason: `internal: tensor "${name}" was dropped too early` })
            }
            segFeeds[name] = t.toOrt()
          }
          const out = yield* sessions
            .use(
              key,
              () => Onnx.encode(Weights.inline(fedTensors.length === 0 ? Segments.toModel(idx, seg) : Segments.feed(Segments.toModel(idx, seg), fedTensors))),
              (session) => Sessions.run(session, segFeeds, seg.outputs)
            )
            .pipe(Effect.mapError((e) => new Errors.ExecutionError({ site: "", reason: e.message })))
          for (const name of seg.outputs) env.set(name, wrapOrt(out[name]))
          yield* fireUpTo(segEnd)
          // drop forward tensors nothing later needs
          for (const name of [...env.keys()]) {
            if ((idx.lastUse.get(name) ?? -1) < segEnd && !pins.has(name) && !idx.graphOutputs.has(name)) env.delete(name)
          }
        }
        forwardDone = true
        const outputs = new Map<string, Tensor>()
        for (const o of loaded.model.graph.outputs) {
          const t = env.get(o.name)
          if (t !== undefined) outputs.set(o.name, t)
        }
        return outputs as ReadonlyMap<string, Tensor>
      })

    const complete = (tokens: Tensor) =>
      Effect.gen(function*() {
        generated = tokens
        const wasStopped = stopped
        stopped = undefined
        yield* runReady
        stopped = stopped ?? wasStopped
      })

    const finish = Effect.gen(function*() {
      if (stopped === undefined) yield* runReady
      const out = new Map<number, Values.Val>()
      const unavailable = new Map<number, Errors.Unavailable>()
      for (const id of resultIds) {
        const v = values.get(id)
        if (v !== undefined && done.has(id)) out.set(id, v)
        else {
          unavailable.set(
            id,
            new Errors.Unavailable({
              site: byId.get(id)?.site ?? "",
              reason:
                stopped !== undefined
                  ? `the trace stopped early${stopped.site === "" ? "" : ` (at ${stopped.site})`} before it was computed`
                  : "the forward pass never reached the module it reads"
            })
          )
        }
      }
      env = new Map()
      return { values: out, unavailable } as Outcome
    })

    const heldTensors = new Set([...[...hookSites.values()].map((site) => site.tensor), ...applyPins])
    const held = (tensor: string) => backwards.length > 0 || heldTensors.has(tensor)

    return { forward, held, stopped: () => stopped !== undefined, complete, finish }
  })
