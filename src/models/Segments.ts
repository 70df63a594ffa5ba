/**
 * Segments: a model cut at positions of its linear node order into
 * sub-models whose inputs and outputs are the tensors crossing the cuts.
 * Chained in order, segments compute what the whole model computes; between
 * them, nnsight-ts reads and replaces activations.
 *
 * A segment `[start, end)` needs as inputs the tensors its nodes consume that
 * are produced before `start` (graph inputs included; initializers and
 * `Constant`s are copied into it instead), and gives as outputs the tensors
 * it produces that a node at or after `end` consumes, or that are graph
 * outputs, plus any extra tensors asked for (reads).
 *
 * @example
 * import * as Segments from "./Segments.js"
 * const plan = Segments.plan(model, tree.order, [120, 300])
 * const sub = Segments.toModel(model, plan.segments[1], plan.types)
 *
 * @since 0.1.0
 */
import * as Onnx from "./Onnx.js"
import * as ElemTypes from "./ElemTypes.js"

/**
 * One node range of the linear order and the tensors crossing its borders.
 *
 * @since 0.1.0
 */
export interface Segment {
  readonly start: number
  readonly end: number
  /** Indices into `graph.nodes`, in linear order (copied Constants included). */
  readonly nodes: ReadonlyArray<number>
  readonly inputs: ReadonlyArray<string>
  readonly outputs: ReadonlyArray<string>
}

/**
 * Facts about a graph that every plan reuses: who produces and who consumes
 * each tensor, and the element type of each.
 *
 * @since 0.1.0
 */
export interface Index {
  readonly model: Onnx.Model
  readonly order: ReadonlyArray<number>
  /** position[nodeIndex] = place in the linear order */
  readonly position: Int32Array
  readonly producer: ReadonlyMap<string, number>
  /** last position (in linear order) at which each tensor is consumed */
  readonly lastUse: ReadonlyMap<string, number>
  readonly initializers: ReadonlySet<string>
  readonly graphOutputs: ReadonlySet<string>
  /** Tensors that subgraphs (If/Loop bodies) read by their outer names. */
  readonly subgraphReads: ReadonlySet<string>
  readonly types: ReadonlyMap<string, number>
  /** Known (possibly symbolic) shapes of tensors, declared on segment borders. */
  readonly shapes: Map<string, ReadonlyArray<Onnx.DimLike>>
}

/**
 * Indexes a model for planning segments over a linear order.
 *
 * @example
 * const index = Segments.index(model, tree.order)
 *
 * @since 0.1.0
 */
export const index = (model: Onnx.Model, order: ReadonlyArray<number>): Index => {
  const graph = model.graph
  const position = new Int32Array(graph.nodes.length)
  order.forEach((n, p) => (position[n] = p))
  const producer = new Map<string, number>()
  const lastUse = new Map<string, number>()
  const subgraphReads = new Set<string>()
  graph.nodes.forEach((node, i) => {
    for (const o of node.outputs) if (o !== "") producer.set(o, i)
    for (const t of node.inputs) {
      if (t === "") continue
      lastUse.set(t, Math.max(lastUse.get(t) ?? -1, position[i]))
    }
    // Subgraphs (If/Loop bodies) may use outer tensors by name.
    for (const name of Onnx.outerNames(node)) {
      lastUse.set(name, Math.max(lastUse.get(name) ?? -1, position[i]))
      subgraphReads.add(name)
    }
  })
  return {
    model,
    order,
    position,
    producer,
    lastUse,
    initializers: new Set(graph.initializers.map((t) => t.name)),
    graphOutputs: new Set(graph.outputs.map((o) => o.name)),
    subgraphReads,
    types: ElemTypes.infer(graph),
    shapes: new Map()
  }
}

/**
 * The segment for the node range `[start, end)`.
 *
 * @example
 * Segments.segment(index, 0, 120, ["/model/layers.0/self_attn/q_proj/MatMul_output_0"])
 *
 * @since 0.1.0
 */
export const segment = (
  idx: Index,
  start: number,
  end: number,
  extraOutputs: ReadonlyArray<string> = []
): Segment => {
  const graph = idx.model.graph
  const nodes: Array<number> = []
  const produced = new Set<string>()
  for (let p = start; p < end; p++) {
    const n = idx.order[p]
    nodes.push(n)
    for (const o of graph.nodes[n].outputs) if (o !== "") produced.add(o)
  }
  const inputs: Array<string> = []
  const seen = new Set<string>()
  const copied: Array<number> = []
  const need = (t: string) => {
    if (t === "" || produced.has(t) || seen.has(t) || idx.initializers.has(t)) return
    seen.add(t)
    const p = idx.producer.get(t)
    if (p !== undefined && graph.nodes[p].opType === "Constant") {
      copied.push(p)
      return
    }
    inputs.push(t)
  }
  for (const n of nodes) {
    graph.nodes[n].inputs.forEach(need)
    Onnx.outerNames(graph.nodes[n]).forEach(need)
  }
  const outputs: Array<string> = []
  const extra = new Set(extraOutputs)
  for (const n of nodes) {
    for (const o of graph.nodes[n].outputs) {
      if (o === "") continue
      if ((idx.lastUse.get(o) ?? -1) >= end || idx.graphOutputs.has(o) || extra.has(o)) outputs.push(o)
    }
  }
  for (const t of extraOutputs) {
    if (!produced.has(t)) throw new Error(`tensor "${t}" is not produced in node range [${start}, ${end})`)
  }
  return { start, end, nodes: [...copied.sort((a, b) => a - b), ...nodes], inputs, outputs }
}

/**
 * Cuts the whole linear order at the given positions (each in `(0, n)`;
 * duplicates and out-of-range positions are ignored).
 *
 * @example
 * Segments.cut(index, [100, 250]).length // 3
 *
 * @since 0.1.0
 */
export const cut = (idx: Index, positions: Iterable<number>): ReadonlyArray<Segment> => {
  const n = idx.order.length
  const bounds = [...new Set([0, ...[...positions].filter((p) => p > 0 && p < n), n])].sort((a, b) => a - b)
  const out: Array<Segment> = []
  for (let k = 0; k + 1 < bounds.length; k++) out.push(segment(idx, bounds[k], bounds[k + 1]))
  return out
}

/**
 * The ONNX model of a segment: its nodes, the initializers they use, typed
 * inputs and outputs, and the model's opsets and functions.
 *
 * With `anyShape`, inputs and outputs declare no shape (for running a
 * module on values of other shapes than the model's).
 *
 * @example
 * const bytes = Onnx.encode(Segments.toModel(index, seg))
 * await ort.InferenceSession.create(bytes)
 *
 * @since 0.1.0
 */
export const toModel = (idx: Index, seg: Segment, options: { readonly anyShape?: boolean } = {}): Onnx.Model => {
  const graph = idx.model.graph
  const nodes = seg.nodes.map((n) => graph.nodes[n])
  const usedInits = new Set<string>()
  for (const node of nodes) {
    for (const t of node.inputs) if (idx.initializers.has(t)) usedInits.add(t)
    for (const t of Onnx.outerNames(node)) if (idx.initializers.has(t)) usedInits.add(t)
  }
  const declared = new Map<string, Onnx.ValueInfo>()
  for (const v of [...graph.inputs, ...graph.outputs, ...graph.valueInfos]) declared.set(v.name, v)
  const valueInfo = (name: string): Onnx.ValueInfo => {
    const d = declared.get(name)
    const t = d && Onnx.tensorType(d)
    if (d && t?.elemType) return options.anyShape ? Onnx.tensorValueInfo(name, t.elemType) : d
    const elemType = idx.types.get(name)
    if (elemType === undefined) throw new Error(`unknown element type of tensor "${name}"`)
    return Onnx.tensorValueInfo(name, elemType, options.anyShape ? undefined : idx.shapes.get(name))
  }
  return {
    ...idx.model,
    graph: {
      ...graph,
      name: `${graph.name}[${seg.start}:${seg.end}]`,
      nodes,
      initializers: graph.initializers.filter((t) => usedInits.has(t.name)),
      inputs: seg.inputs.map(valueInfo),
      outputs: seg.outputs.map(valueInfo),
      valueInfos: graph.valueInfos.filter((v) => !seg.inputs.includes(v.name) && !seg.outputs.includes(v.name))
    }
  }
}

/**
 * A segment model in which the consumers of each tensor of `fed` read a new
 * input instead (named by `fedName`), so a value known before the run
 * replaces the tensor without cutting the model there. The tensor is still
 * computed, and stays an output when the segment had it as one.
 *
 * @example
 * const model = Segments.feed(Segments.toModel(index, seg), ["/model/layers.1/mlp/down_proj/MatMul_output_0"])
 *
 * @since 0.1.0
 */
export const feed = (model: Onnx.Model, fed: ReadonlyArray<string>): Onnx.Model => {
  const graph = model.graph
  const swap = new Map(fed.map((t) => [t, fedName(t)]))
  const declared = new Map([...graph.inputs, ...graph.outputs, ...graph.valueInfos].map((v) => [v.name, v]))
  const inputs = fed.map((t) => {
    const v = declared.get(t)
    if (v === undefined) throw new Error(`tensor "${t}" has no declared type in the segment`)
    return { ...v, name: fedName(t) }
  })
  return {
    ...model,
    graph: {
      ...graph,
      nodes: graph.nodes.map((n) => (n.inputs.some((t) => swap.has(t)) ? { ...n, inputs: n.inputs.map((t) => swap.get(t) ?? t) } : n)),
      inputs: [...graph.inputs, ...inputs]
    }
  }
}

/**
 * The input name under which {@link feed} passes a replaced tensor.
 *
 * @since 0.1.0
 */
export const fedName = (tensor: string): string => `${tensor}::fed`
