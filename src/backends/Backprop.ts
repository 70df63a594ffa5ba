/**
 * Backward passes inside traces: the pieces the local interpreter chains.
 * The loss is built by intervention operations from module values; it is
 * lowered to ONNX and differentiated (giving the gradients of those values),
 * then the model is differentiated segment by segment, from its end back to
 * its start, with cuts right after every tensor whose gradient is read or
 * set, so each such gradient is complete (and replaceable) at its cut.
 * Backward models are built once per segment and cached with their sessions.
 *
 * @example
 * import * as Backprop from "./Backprop.js"
 * const plan = Backprop.plan(loaded, [tensorA, tensorB])
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import * as ort from "onnxruntime-node"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import type * as Graph from "../core/Graph.js"
import * as Literal from "../core/Literal.js"
import { Tensor } from "../core/Tensor.js"
import type * as Loaded from "../models/Loaded.js"
import * as Onnx from "../models/Onnx.js"
import * as Segments from "../models/Segments.js"
import * as Weights from "../models/Weights.js"
import * as Autodiff from "./Autodiff.js"
import * as Sessions from "./Sessions.js"

/**
 * One segment of the backward chain and its backward model.
 *
 * @since 0.1.0
 */
export interface Step {
  readonly segment: Segments.Segment
  readonly outputs: ReadonlyArray<string>
  readonly wrt: ReadonlyArray<string>
  readonly backward: Autodiff.Backward
  readonly key: string
}

const cache = new WeakMap<Loaded.Loaded, Map<string, Step>>()
const shapesOf = new WeakMap<Loaded.Loaded, Readonly<Record<string, ReadonlyArray<number | string>>>>()

const isFloat = (loaded: Loaded.Loaded, name: string) => Autodiff.isDifferentiable(loaded.index.types.get(name))

/**
 * The border right after the node that makes `tensor` (0 for a model input).
 *
 * @example
 * Backprop.cutAfter(loaded, "/model/layers.1/Add_1_output_0")
 *
 * @since 0.1.0
 */
export const cutAfter = (loaded: Loaded.Loaded, tensor: string): number => {
  const p = loaded.index.producer.get(tensor)
  return p === undefined ? 0 : loaded.index.position[p] + 1
}

/**
 * The node-range borders of a backward chain: right after the producer of
 * every tensor whose gradient is read or set.
 *
 * @since 0.1.0
 */
export const cuts = (loaded: Loaded.Loaded, tensors: Iterable<string>): ReadonlyArray<number> =>
  [...new Set([0, loaded.tree.order.length, ...[...tensors].map((t) => cutAfter(loaded, t))])].sort((a, b) => a - b)

/**
 * The backward model of the segment `[start, end)` given the segment outputs
 * that carry gradients and the initializers whose gradients are wanted.
 *
 * @since 0.1.0
 */
export const step = (
  loaded: Loaded.Loaded,
  start: number,
  end: number,
  seeded: ReadonlySet<string>,
  params: ReadonlySet<string>
): Step | undefined => {
  const idx = loaded.index
  const segment = Segments.segment(idx, start, end)
  const outputs = segment.outputs.filter((o) => seeded.has(o) && isFloat(loaded, o))
  if (outputs.length === 0) return undefined
  const used = new Set(segment.nodes.flatMap((n) => loaded.model.graph.nodes[n].inputs))
  const wrt = [...segment.inputs.filter((i) => isFloat(loaded, i)), ...[...params].filter((p) => used.has(p))]
  if (wrt.length === 0) return undefined
  const key = `${start}:${end}|${outputs.join(",")}|${wrt.join(",")}`
  let byKey = cache.get(loaded)
  if (byKey === undefined) cache.set(loaded, (byKey = new Map()))
  let s = byKey.get(key)
  if (s === undefined) {
    let shapes = shapesOf.get(loaded)
    if (shapes === undefined) shapesOf.set(loaded, (shapes = Autodiff.staticShapes(loaded.model)))
    const backward = Autodiff.backward(Segments.toModel(idx, segment), { outputs, wrt, shapes })
    s = { segment, outputs, wrt, backward, key: `bwd:${key}` }
    byKey.set(key, s)
  }
  return s
}

/**
 * Every forward tensor the backward chain may need (to keep from the forward
 * pass): the activations each step's backward model reads.
 *
 * @since 0.1.0
 */
export const neededForward = (loaded: Loaded.Loaded, borders: ReadonlyArray<number>, params: ReadonlySet<string>): ReadonlySet<string> => {
  const idx = loaded.index
  const all = new Set<string>()
  // assume every float output of a segment may carry a gradient
  for (let k = borders.length - 2; k >= 0; k--) {
    const seg = Segments.segment(idx, borders[k], borders[k + 1])
    const s = step(loaded, borders[k], borders[k + 1], new Set(seg.outputs), params)
    for (const t of s?.backward.forwardInputs ?? []) all.add(t)
  }
  return all
}

/**
 * Runs one backward step: seeds for its outputs and the forward tensors it
 * reads; gives the gradient of each `wrt`.
 *
 * @since 0.1.0
 */
export const runStep = (
  sessions: Sessions.Cache,
  s: Step,
  seeds: ReadonlyMap<string, Tensor>,
  forward: (name: string) => Tensor | undefined
): Effect.Effect<ReadonlyMap<string, Tensor>, Errors.TraceError> =>
  Effect.gen(function*() {
    const session = yield* sessions.get(s.key, () => Onnx.encode(Weights.inline(s.backward.model))).pipe(
      Effect.mapError((e) => new Errors.ExecutionError({ site: "", reason: e.message }))
    )
    const feeds: Record<string, ort.Tensor> = {}
    s.outputs.forEach((o, k) => (feeds[s.backward.gradInputs[k]] = seeds.get(o)!.toOrt()))
    for (const name of s.backward.forwardInputs) {
      const t = forward(name)
      if (t === undefined) return yield* new Errors.ExecutionError({ site: "", reason: `internal: the forward tensor "${name}" was not kept for backward` })
      feeds[name] = t.toOrt()
    }
    const out = yield* Sessions.run(session, feeds, s.backward.gradOutputs).pipe(
      Effect.mapError((e) => new Errors.ExecutionError({ site: "", reason: e.message }))
    )
    const grads = new Map<string, Tensor>()
    s.wrt.forEach((w, k) => grads.set(w, Tensor.fromOrt(out[s.backward.gradOutputs[k]])))
    return grads as ReadonlyMap<string, Tensor>
  })

/**
 * The gradients of a loss built by intervention operations, with respect to
 * the module values it reads: the intervention subgraph is lowered to ONNX,
 * run forward and differentiated.
 *
 * @since 0.1.0
 */
export const lossGradients = (
  sessions: Sessions.Cache,
  nodes: ReadonlyMap<number, Graph.Node>,
  loss: number,
  valueOf: (id: number) => Tensor | number | boolean | undefined,
  isLeaf: (node: Graph.Node) => boolean
): Effect.Effect<ReadonlyMap<number, Tensor>, Errors.TraceError> => expressionGradients(sessions, nodes, loss, undefined, valueOf, isLeaf)

/**
 * The gradients of an intervention value (a loss, or the value a set puts
 * into the model) with respect to the leaves it is built from, given the
 * gradient of the value itself (`seed`; ones for a loss). A value built from
 * no leaf has no gradients (an empty map), except a loss, which is an error.
 *
 * @example
 * const grads = yield* Backprop.expressionGradients(sessions, byId, set.value, g, valueOf, isLeaf)
 *
 * @since 0.1.0
 */
export const expressionGradients = (
  sessions: Sessions.Cache,
  nodes: ReadonlyMap<number, Graph.Node>,
  loss: number,
  seed: Tensor | undefined,
  valueOf: (id: number) => Tensor | number | boolean | undefined,
  isLeaf: (node: Graph.Node) => boolean
): Effect.Effect<ReadonlyMap<number, Tensor>, Errors.TraceError> =>
  Effect.gen(function*() {
    const root = nodes.get(loss)
    if (seed !== undefined) {
      // a set of a leaf itself, or of a plain number: nothing to lower
      if (!(valueOf(loss) instanceof Tensor)) return new Map()
      if (root === undefined || isLeaf(root)) return new Map([[loss, seed]])
    }
    // the operations between the leaves (module values) and the loss
    const steps: Array<Autodiff.InterventionStep> = []
    const inputs: Array<Autodiff.InterventionInput> = []
    const leaves: Array<number> = []
    const seen = new Set<number>()
    const visit = (id: number): void => {
      if (seen.has(id)) return
      seen.add(id)
      const node = nodes.get(id)
      const v = valueOf(id)
      if (node === undefined || (isLeaf(node) && v instanceof Tensor)) {
        if (!(v instanceof Tensor)) throw new Errors.InvalidValue({ site: node?.site ?? "", reason: "backward() needs this value, which was not computed" })
        leaves.push(id)
        inputs.push({ name: `v${id}`, dtype: v.dtype, shape: [...v.shape] })
        return
      }
      switch (node._tag) {
        case "Op":
          node.args.forEach(visit)
          steps.push({ op: node.op, args: node.args.map((a) => `v${a}`), attrs: node.attrs, output: `v${id}` })
          return
        case "Scalar":
          inputs.push({ name: `v${id}`, dtype: "float32", shape: [], value: Float32Array.of(Number(node.value)) })
          return
        case "Constant": {
          const t = Literal.toTensor(node.value)
          inputs.push({ name: `v${id}`, dtype: t.dtype, shape: [...t.shape], value: t.data as never })
          return
        }
        default: {
          if (!(v instanceof Tensor)) throw new Errors.InvalidValue({ site: node.site, reason: "backward() cannot differentiate through this value" })
          inputs.push({ name: `v${id}`, dtype: v.dtype, shape: [...v.shape], value: v.data as never })
        }
      }
    }
    yield* Effect.try({ try: () => visit(loss), catch: (e) => (Errors.isTraceError(e) ? e : new Errors.InvalidValue({ site: nodes.get(loss)?.site ?? "", reason: String(e) })) })
    const site = nodes.get(loss)?.site ?? ""
    if (leaves.length === 0) {
      if (seed !== undefined) return new Map()
      return yield* new Errors.InvalidValue({ site, reason: "this loss reads no module value or parameter, so it has no gradient to propagate" })
    }
    const built = yield* Effect.try({
      try: () => {
        const lowered = Autodiff.lowerIntervention(steps, inputs, [`v${loss}`])
        const bw = Autodiff.backward(lowered, { outputs: [`v${loss}`], wrt: leaves.map((l) => `v${l}`) })
        return { lowered: Autodiff.withOutputs(lowered, bw.forwardInputs.filter((n) => !inputs.some((i) => i.name === n))), bw }
      },
      catch: (e) => new Errors.InvalidValue({ site, reason: `cannot differentiate this loss: ${e instanceof Error ? e.message : String(e)}` })
    })
    // sessions are cached by the loss's structure (ops, attributes, input types and shapes, constants)
    const key = JSON.stringify({
      steps,
      inputs: inputs.map((i) => ({ n: i.name, d: i.dtype, s: i.shape, v: i.value === undefined ? null : Array.from(i.value as ArrayLike<unknown>, String) }))
    })
    const toExec = (e: Sessions.OrtError) => new Errors.ExecutionError({ site, reason: e.message })
    const forwardSession = yield* sessions.get(`loss-fwd:${key}`, () => Onnx.encode(built.lowered)).pipe(Effect.mapError(toExec))
    const backwardSession = yield* sessions.get(`loss-bwd:${key}`, () => Onnx.encode(built.bw.model)).pipe(Effect.mapError(toExec))
    return yield* Effect.gen(function*() {
      const feeds: Record<string, ort.Tensor> = {}
      for (const l of leaves) feeds[`v${l}`] = (valueOf(l) as Tensor).toOrt()
      const fwd = yield* Sessions.run(forwardSession, feeds, forwardSession.outputNames).pipe(
        Effect.mapError((e) => new Errors.ExecutionError({ site, reason: e.message }))
      )
      const lossValue = Tensor.fromOrt(fwd[`v${loss}`])
      const bfeeds: Record<string, ort.Tensor> = {
        [built.bw.gradInputs[0]]: (seed ?? new Tensor(lossValue.dtype, lossValue.shape, DType.arrayFor(lossValue.dtype, lossValue.size).fill(1 as never) as never)).toOrt()
      }
      for (const name of built.bw.forwardInputs) bfeeds[name] = feeds[name] ?? fwd[name]
      const out = yield* Sessions.run(backwardSession, bfeeds, built.bw.gradOutputs).pipe(
        Effect.mapError((e) => new Errors.ExecutionError({ site, reason: e.message }))
      )
      const grads = new Map<number, Tensor>()
      leaves.forEach((l, k) => grads.set(l, Tensor.fromOrt(out[built.bw.gradOutputs[k]])))
      return grads as ReadonlyMap<number, Tensor>
    })
  })
