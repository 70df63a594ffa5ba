/**
 * Reverse-mode automatic differentiation that writes backward ONNX graphs.
 *
 * onnxruntime-node has no autograd, so nnsight-ts builds it: {@link backward}
 * reads a forward ONNX model (a whole model, a segment from
 * `Segments.toModel`, or an intervention graph lowered with
 * {@link lowerIntervention}) and emits a *separate* ONNX model that computes
 * vector-Jacobian products, so onnxruntime runs the backward pass on any
 * execution provider.
 *
 * **The backward model** takes
 * - one seed gradient per requested output (`gradInputs[i]`, named
 *   `grad::<output>`; same element type and shape as the output), and
 * - the forward tensors its rules read (`forwardInputs`): activations saved
 *   from the forward run, and forward graph inputs. The caller fetches them
 *   as extra outputs of the forward run (see {@link withOutputs}); nothing
 *   of the forward pass is recomputed, except the nodes inside `If` branches
 *   (whose tensors are not visible outside them). Forward initializers and
 *   `Constant` nodes the rules read are copied into the backward model.
 *
 * and gives one gradient per `wrt` tensor (`gradOutputs[j]`), of the shape and
 * element type of that tensor (zeros when no path leads from it to the
 * outputs). Tensors used several times (tied weights, residual streams) get
 * their contributions summed. For a chain of segments, run `backward` per
 * segment in reverse order, feeding each segment's input gradients as the
 * seeds of the previous segment's outputs (or run it once on the whole model
 * with `wrt` the activations of interest).
 *
 * **Rules.** {@link rules} is a typed table `satisfies Record<DiffOpName,
 * GradRule>`: a rule gets the forward node, its output gradients, which inputs
 * need gradients, and helpers that emit ONNX nodes, and returns the input
 * gradients. Only nodes on a path from `wrt` to `outputs` are differentiated;
 * paths carry floating-point tensors only, so integer and boolean tensors
 * (shapes, indices, masks, `Shape`/`Range`/comparisons) never get gradients.
 * A node on a path whose operator has no rule fails with
 * {@link NoGradientRule} naming it; nodes off the paths are ignored.
 *
 * **Shapes.** Backward graphs are shape-polymorphic: shapes are read at run
 * time (`Shape` ops), except where a static analysis (ranks, numeric dims,
 * and symbolic dims that must be equal) proves them. Broadcasting is undone
 * by `Ctx.unbroadcast`: statically (ReduceSum over the leading axes and
 * the axes where the input has size 1) when the analysis knows the shapes,
 * else at run time: `axes = NonZero(Equal(Concat(ones, Shape(x)), 1))`,
 * `ReduceSum(g, axes, keepdims=1, noop_with_empty_axes=1)` then `Reshape` to
 * `Shape(x)` (reducing an axis of size 1 that was not broadcast is harmless).
 * When a rule needs the shape of a forward tensor, it is built from
 * constants and the shapes of gradients already in the backward graph when
 * the analysis can (so the activation itself need not be saved), else read
 * with `Shape` from the saved activation.
 *
 * **Opsets.** Nodes are emitted for the forward model's opset (13 or later;
 * the backward model keeps the forward model's opset imports): `ReduceSum`,
 * `Unsqueeze`, `Squeeze`, `Split` take axes/sizes as inputs (13+), other
 * reductions take axes as attributes before 18; gradients of `Gather`,
 * `GatherElements` and `GatherND` accumulate with `ScatterND`/
 * `ScatterElements` `reduction="add"` from opset 16 and with a one-hot
 * `Gemm` (or masked sum) before.
 *
 * **Segments.** A segment model (`Segments.toModel`) declares no shapes for
 * its inputs; pass the whole model's {@link staticShapes} as `shapes` so the
 * rules that need ranks (MatMul, Transpose without `perm`, Gather on an axis
 * other than 0, ...) find them. {@link withOutputs} adds the tensors a
 * backward model needs as extra outputs of a forward model.
 *
 * **Intervention ops.** {@link interventionRules}
 * (`satisfies Record<Ops.OpName, InterventionRule>`) lowers every
 * intervention operation to ONNX nodes (Index to Slice/Squeeze/Unsqueeze,
 * SetIndex to ScatterND, ...), so the intervention part of a trace is
 * differentiated by the same ONNX rules ({@link lowerIntervention} builds the
 * model); the ops marked `differentiable: false` (ArgMax, TopK's indices,
 * comparisons, Not/And/Or, Shape) give integer or boolean tensors and so no
 * gradient.
 *
 * @example
 * import * as Autodiff from "./Autodiff.js"
 * const bw = Autodiff.backward(model, { outputs: ["logits"], wrt: ["/model/layers.0/Add_1_output_0", "model.norm.weight"] })
 * // forward run: fetch bw.forwardInputs as extra outputs (Autodiff.withOutputs)
 * // backward run: feeds { [bw.gradInputs[0]]: dLoss/dLogits, ...saved }, fetch bw.gradOutputs
 *
 * @since 0.1.0
 */
import { Data } from "effect"
import * as DType from "../core/DType.js"
import * as Index from "../core/Index.js"
import type * as Ops from "../core/Ops.js"
import { decodeItems } from "../core/Tracer.js"
import * as ElemTypes from "../models/ElemTypes.js"
import * as Onnx from "../models/Onnx.js"
import * as OnnxBuilder from "../models/OnnxBuilder.js"

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/**
 * A node on a path from `wrt` to `outputs` runs an operator without a
 * gradient rule.
 *
 * @since 0.1.0
 */
export class NoGradientRule extends Data.TaggedError("NoGradientRule")<{
  readonly opType: string
  readonly domain: string
  readonly node: string
}> {
  override get message(): string {
    const op = this.domain === "" || this.domain === "ai.onnx" ? this.opType : `${this.domain}.${this.opType}`
    return `no gradient rule for operator ${op} (node "${this.node}"), which lies on a path from the differentiated tensors to the outputs`
  }
}

/**
 * A rule exists but cannot differentiate this node: an unknown rank where it
 * needs one, an unsupported mode or attribute, a too old opset.
 *
 * @since 0.1.0
 */
export class UnsupportedGradient extends Data.TaggedError("UnsupportedGradient")<{
  readonly opType: string
  readonly node: string
  readonly reason: string
}> {
  override get message(): string {
    return `cannot differentiate ${this.opType} node "${this.node}": ${this.reason}`
  }
}

/**
 * The request itself is wrong: an unknown tensor, a non-float output or
 * `wrt` tensor, an opset before 13.
 *
 * @since 0.1.0
 */
export class InvalidGradientRequest extends Data.TaggedError("InvalidGradientRequest")<{
  readonly reason: string
}> {
  override get message(): string {
    return this.reason
  }
}

/**
 * Every error {@link backward} throws.
 *
 * @since 0.1.0
 */
export type AutodiffError = NoGradientRule | UnsupportedGradient | InvalidGradientRequest

// ---------------------------------------------------------------------------
// Static shape analysis: ranks, numeric and symbolic dims, small int values
// ---------------------------------------------------------------------------

/**
 * A statically known dimension: a number, or a symbol. Two equal symbols
 * are equal sizes at run time; a symbol says nothing else.
 *
 * @since 0.1.0
 */
export type SDim = number | string

/**
 * What the analysis knows of a tensor: its dims (when its rank is known) and,
 * for small integer tensors (shapes, axes), its values.
 *
 * @since 0.1.0
 */
export interface Info {
  readonly dims?: ReadonlyArray<SDim>
  readonly value?: ReadonlyArray<SDim>
}

const isNum = (d: SDim | undefined): d is number => typeof d === "number"
const allNum = (ds: ReadonlyArray<SDim>): ds is ReadonlyArray<number> => ds.every(isNum)
const BIG = 2 ** 62

class ShapeEnv {
  private readonly local = new Map<string, Info>()
  constructor(
    private readonly parent: ShapeEnv | undefined,
    private readonly counter: { n: number }
  ) {}
  fresh(): string {
    return `?${this.counter.n++}`
  }
  get(name: string): Info | undefined {
    return this.local.get(name) ?? this.parent?.get(name)
  }
  set(name: string, info: Info | undefined): void {
    if (info !== undefined && name !== "") this.local.set(name, info)
  }
  child(): ShapeEnv {
    return new ShapeEnv(this, this.counter)
  }
}

const tensorInfo = (t: Onnx.TensorProto): Info => {
  const dims = [...t.dims]
  const n = Onnx.elementCount(dims)
  const intLike = t.dataType === DType.OnnxCode.INT64 || t.dataType === DType.OnnxCode.INT32 || t.dataType === DType.OnnxCode.BOOL
  if (intLike && n <= 64 && dims.length <= 1) {
    try {
      const data = Onnx.tensorData(t) as ArrayLike<number | bigint>
      return { dims, value: Array.from(data, (v) => Number(v)) }
    } catch {
      return { dims }
    }
  }
  return { dims }
}

const declaredInfo = (v: Onnx.ValueInfo, prefix: string): Info | undefined => {
  const t = Onnx.tensorType(v)
  if (t?.shape === undefined) return undefined
  return {
    dims: t.shape.map((d, k) =>
      d._tag === "Value" ? d.value : d._tag === "Param" ? `$${d.param}` : `${prefix}${v.name}#${k}`
    )
  }
}

const bcast = (list: ReadonlyArray<ReadonlyArray<SDim> | undefined>, env: ShapeEnv): ReadonlyArray<SDim> | undefined => {
  if (list.some((d) => d === undefined)) return undefined
  const ds = list as ReadonlyArray<ReadonlyArray<SDim>>
  const r = Math.max(0, ...ds.map((d) => d.length))
  const out: Array<SDim> = []
  for (let i = 0; i < r; i++) {
    const here = ds.map((d) => d[d.length - r + i]).filter((d) => d !== undefined && d !== 1)
    if (here.length === 0) out.push(1)
    else if (here.every((d) => d === here[0])) out.push(here[0])
    else out.push(here.find(isNum) ?? env.fresh())
  }
  return out
}

const normAxis = (a: number, r: number): number => (a < 0 ? a + r : a)

/** Product bookkeeping for Reshape's -1: numeric factor and a multiset of symbols. */
const factor = (ds: ReadonlyArray<SDim>): { n: number; syms: Array<string> } => {
  let n = 1
  const syms: Array<string> = []
  for (const d of ds) {
    if (isNum(d)) n *= d
    else syms.push(d)
  }
  return { n, syms }
}

const fold2 = (a: SDim, b: SDim, op: string, env: ShapeEnv): SDim => {
  if (isNum(a) && isNum(b)) {
    switch (op) {
      case "Add":
        return a + b
      case "Sub":
        return a - b
      case "Mul":
        return a * b
      case "Div":
        return b === 0 ? env.fresh() : Math.trunc(a / b)
    }
  }
  if (op === "Mul" && b === 1) return a
  if (op === "Mul" && a === 1) return b
  if ((op === "Add" || op === "Sub") && b === 0) return a
  if (op === "Add" && a === 0) return b
  if (op === "Div" && b === 1) return a
  // A derived symbol named by its expression: equal expressions of equal sizes are equal sizes.
  const sign = { Add: "+", Sub: "-", Mul: "*", Div: "/" }[op]
  if (sign === undefined) return env.fresh()
  const [p, q] = (op === "Add" || op === "Mul") && String(b) < String(a) ? [b, a] : [a, b]
  return `(${p}${sign}${q})`
}

/** The sum of dims along a concatenation axis, as a number or a derived symbol. */
const sumDims = (ds: ReadonlyArray<SDim>): SDim => {
  const n = ds.filter(isNum).reduce((p, q) => p + q, 0)
  const syms = ds.filter((d): d is string => !isNum(d)).sort()
  if (syms.length === 0) return n
  if (syms.length === 1 && n === 0) return syms[0]
  return `(${[...syms, ...(n === 0 ? [] : [String(n)])].join("+")})`
}

const sliceLen = (dim: number, start: number, end: number, step: number): number => {
  const clampS = (v: number, lo: number, hi: number) => Math.min(Math.max(v, lo), hi)
  let s = start < 0 ? start + dim : start
  let e = end < 0 ? end + dim : end
  if (step > 0) {
    s = clampS(s, 0, dim)
    e = clampS(e, 0, dim)
    return Math.max(0, Math.ceil((e - s) / step))
  }
  s = clampS(s, -1, dim - 1)
  e = clampS(e, -1, dim - 1)
  return Math.max(0, Math.ceil((s - e) / -step))
}

const sliceValues = <T>(v: ReadonlyArray<T>, start: number, end: number, step: number): Array<T> => {
  const dim = v.length
  let s = start < 0 ? start + dim : start
  let e = end < 0 ? end + dim : end
  const out: Array<T> = []
  if (step > 0) {
    s = Math.min(Math.max(s, 0), dim)
    e = Math.min(Math.max(e, 0), dim)
    for (let i = s; i < e; i += step) out.push(v[i])
  } else {
    s = Math.min(Math.max(s, -1), dim - 1)
    e = Math.min(Math.max(e, -1), dim - 1)
    for (let i = s; i > e; i += step) out.push(v[i])
  }
  return out
}

const sameOps = new Set([
  "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Cos", "Cosh",
  "CumSum", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
  "LeakyRelu", "Log", "LogSoftmax", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
  "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "Trilu", "ScatterND", "ScatterElements",
  "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"
])
const bcastOps = new Set([
  "Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor",
  "Mod", "PRelu", "Max", "Min", "Sum", "Mean", "Where", "BitShift"
])

const reduceAxesFromInput = (op: string, opset: number): boolean => (op === "ReduceSum" ? opset >= 13 : opset >= 18)

/** Static info of a node's outputs. */
const inferNode = (node: Onnx.Node, env: ShapeEnv, opset: number): ReadonlyArray<Info | undefined> => {
  const inp = (k: number): Info | undefined => {
    const n = node.inputs[k]
    return n === undefined || n === "" ? undefined : env.get(n)
  }
  const has = (k: number) => node.inputs[k] !== undefined && node.inputs[k] !== ""
  const dims = (k: number) => inp(k)?.dims
  const vals = (k: number) => inp(k)?.value
  const nums = (k: number): ReadonlyArray<number> | undefined => {
    const v = vals(k)
    return v !== undefined && allNum(v) ? v : undefined
  }
  const attrInts = (name: string) => Onnx.attrInts(node, name)?.map(Number)
  const attrInt = (name: string, dflt: number) => Number(Onnx.attrInt(node, name) ?? BigInt(dflt))
  const freshDims = (r: number) => Array.from({ length: r }, () => env.fresh())
  const one = (info: Info | undefined) => [info]
  const op = node.opType
  if (sameOps.has(op)) {
    const d = dims(0)
    const v = op === "Cast" || op === "Identity" || op === "Neg" ? vals(0) : undefined
    const first: Info | undefined = d === undefined ? undefined : { dims: d, ...(v ? { value: op === "Neg" ? v.map((x) => (isNum(x) ? -x : env.fresh())) : v } : {}) }
    if (op === "LayerNormalization" || op === "SimplifiedLayerNormalization" || op === "RMSNormalization") {
      const axis = attrInt("axis", -1)
      const rest = d === undefined ? undefined : { dims: d.map((x, i) => (i >= normAxis(axis, d.length) ? 1 : x)) }
      return node.outputs.map((_, k) => (k === 0 ? first : rest))
    }
    return node.outputs.map((_, k) => (k === 0 ? first : undefined))
  }
  if (bcastOps.has(op)) {
    const ds = node.inputs.map((_, k) => dims(k))
    const out = bcast(ds, env)
    let value: ReadonlyArray<SDim> | undefined
    const a = vals(0)
    const b = vals(1)
    if (out !== undefined && out.length <= 1 && a !== undefined && b !== undefined && (op === "Add" || op === "Sub" || op === "Mul" || op === "Div")) {
      const n = out.length === 0 ? 1 : out[0]
      if (isNum(n)) value = Array.from({ length: n }, (_, i) => fold2(a[a.length === 1 ? 0 : i], b[b.length === 1 ? 0 : i], op, env))
    }
    if (out !== undefined && out.length <= 1 && a !== undefined && b !== undefined && op === "Equal") {
      const n = out.length === 0 ? 1 : out[0]
      if (isNum(n)) {
        const eq: Array<SDim> = []
        for (let i = 0; i < n; i++) {
          const x = a[a.length === 1 ? 0 : i]
          const y = b[b.length === 1 ? 0 : i]
          if (isNum(x) && isNum(y)) eq.push(x === y ? 1 : 0)
          else if (x === y) eq.push(1)
          else if ((isNum(x) && x < 0) || (isNum(y) && y < 0)) eq.push(0)
          else break
        }
        if (eq.length === n) value = eq
      }
    }
    if (out !== undefined && out.length <= 1 && op === "Where") {
      const c = vals(0)
      const x = vals(1)
      const y = vals(2)
      const n = out.length === 0 ? 1 : out[0]
      if (c && x && y && isNum(n) && allNum(c)) {
        value = Array.from({ length: n }, (_, i) => (c[c.length === 1 ? 0 : i] ? x[x.length === 1 ? 0 : i] : y[y.length === 1 ? 0 : i]))
      }
    }
    return one(out === undefined ? undefined : { dims: out, ...(value ? { value } : {}) })
  }
  switch (op) {
    case "Constant": {
      const t = Onnx.attrTensor(node, "value")
      if (t) return one(tensorInfo(t))
      const i = Onnx.attrInt(node, "value_int")
      if (i !== undefined) return one({ dims: [], value: [Number(i)] })
      const is = Onnx.attrInts(node, "value_ints")
      if (node.attributes.some((a) => a.name === "value_ints")) return one({ dims: [is?.length ?? 0], value: (is ?? []).map(Number) })
      if (node.attributes.some((a) => a.name === "value_float")) return one({ dims: [] })
      const fs = Onnx.attrFloats(node, "value_floats")
      if (fs) return one({ dims: [fs.length] })
      return one(undefined)
    }
    case "Shape": {
      const d = dims(0)
      if (d === undefined) return one(undefined)
      const r = d.length
      const start = Math.min(Math.max(normAxis(attrInt("start", 0), r), 0), r)
      const end = Math.min(Math.max(normAxis(attrInt("end", r), r), 0), r)
      const v = d.slice(start, Math.max(start, end))
      return one({ dims: [v.length], value: v })
    }
    case "Size":
      return one({ dims: [] })
    case "Gather": {
      const d = dims(0)
      const id = dims(1)
      if (d === undefined || id === undefined) return one(undefined)
      const a = normAxis(attrInt("axis", 0), d.length)
      const out = [...d.slice(0, a), ...id, ...d.slice(a + 1)]
      const v = vals(0)
      const iv = nums(1)
      let value: ReadonlyArray<SDim> | undefined
      if (d.length === 1 && v !== undefined && iv !== undefined) value = iv.map((i) => v[i < 0 ? i + v.length : i])
      return one({ dims: out, ...(value ? { value } : {}) })
    }
    case "Unsqueeze": {
      const d = dims(0)
      const axes = opset >= 13 ? nums(1) : attrInts("axes")
      if (d === undefined || axes === undefined) return one(undefined)
      const r = d.length + axes.length
      const norm = axes.map((a) => normAxis(a, r)).sort((p, q) => p - q)
      const out = [...d]
      for (const a of norm) out.splice(a, 0, 1)
      const v = vals(0)
      return one({ dims: out, ...(v && v.length === 1 ? { value: v } : {}) })
    }
    case "Squeeze": {
      const d = dims(0)
      if (d === undefined) return one(undefined)
      const axes = opset >= 13 ? (has(1) ? nums(1) : undefined) : attrInts("axes")
      const explicit = opset >= 13 ? has(1) : axes !== undefined
      if (explicit && axes === undefined) return one(undefined)
      let out: Array<SDim>
      if (axes === undefined) {
        if (!d.every(isNum)) return one(undefined)
        out = d.filter((x) => x !== 1)
      } else {
        const norm = axes.map((a) => normAxis(a, d.length))
        out = d.filter((_, i) => !norm.includes(i))
      }
      const v = vals(0)
      return one({ dims: out, ...(v && v.length === 1 ? { value: v } : {}) })
    }
    case "Concat": {
      const ds = node.inputs.map((_, k) => dims(k))
      if (ds.some((d) => d === undefined) || ds.length === 0) return one(undefined)
      const dd = ds as ReadonlyArray<ReadonlyArray<SDim>>
      const r = dd[0].length
      const a = normAxis(attrInt("axis", 0), r)
      const along = dd.map((d) => d[a])
      const out = dd[0].map((x, i) => {
        if (i === a) return sumDims(along)
        return dd.map((d) => d[i]).find(isNum) ?? x
      })
      const vs = node.inputs.map((_, k) => vals(k))
      const value = r === 1 && vs.every((v) => v !== undefined) ? vs.flatMap((v) => [...v!]) : undefined
      return one({ dims: out, ...(value ? { value } : {}) })
    }
    case "Reshape": {
      const target = vals(1)
      const d = dims(0)
      if (target === undefined) {
        const td = dims(1)
        return one(td && td.length === 1 && isNum(td[0]) ? { dims: freshDims(td[0]) } : undefined)
      }
      const allowzero = attrInt("allowzero", 0) === 1
      const out: Array<SDim | undefined> = target.map((t, i) => (t === 0 && !allowzero ? d?.[i] : t === -1 ? undefined : t))
      const hole = out.findIndex((x) => x === undefined)
      if (hole >= 0) {
        const filled = target[hole] === -1 && d !== undefined && out.every((x, i) => i === hole || x !== undefined)
        if (filled) {
          const fin = factor(d!)
          const fout = factor(out.filter((x, i) => i !== hole) as Array<SDim>)
          const rest = [...fin.syms]
          let ok = true
          for (const s of fout.syms) {
            const at = rest.indexOf(s)
            if (at < 0) ok = false
            else rest.splice(at, 1)
          }
          if (ok && fout.n !== 0 && fin.n % fout.n === 0) {
            const n = fin.n / fout.n
            out[hole] = rest.length === 0 ? n : rest.length === 1 && n === 1 ? rest[0] : env.fresh()
          } else out[hole] = env.fresh()
        }
        for (let i = 0; i < out.length; i++) if (out[i] === undefined) out[i] = env.fresh()
      }
      return one({ dims: out as Array<SDim>, ...(d && d.length <= 1 && vals(0) ? { value: vals(0) } : {}) })
    }
    case "Expand": {
      const d = dims(0)
      const target = vals(1) ?? (dims(1) && isNum(dims(1)![0]) ? freshDims(dims(1)![0] as number) : undefined)
      return one(d === undefined || target === undefined ? undefined : { dims: bcast([d, target], env)! })
    }
    case "ConstantOfShape": {
      const v = vals(0)
      if (v !== undefined) {
        const t = Onnx.attrTensor(node, "value")
        let value: Array<SDim> | undefined
        if (v.length <= 1 && allNum(v) && (v[0] ?? 1) <= 64 && t && (t.dataType === DType.OnnxCode.INT64 || t.dataType === DType.OnnxCode.INT32)) {
          const x = Number((Onnx.tensorData(t) as ArrayLike<number | bigint>)[0] ?? 0)
          value = new Array(v[0] ?? 1).fill(x)
        }
        return one({ dims: v, ...(value ? { value } : {}) })
      }
      const td = dims(0)
      return one(td && td.length === 1 && isNum(td[0]) ? { dims: freshDims(td[0]) } : undefined)
    }
    case "Range": {
      const [s, l, dl] = [nums(0), nums(1), nums(2)]
      if (s && l && dl && dl[0] !== 0) {
        const n = Math.max(0, Math.ceil((l[0] - s[0]) / dl[0]))
        const value = n <= 64 ? Array.from({ length: n }, (_, i) => s[0] + i * dl[0]) : undefined
        return one({ dims: [n], ...(value ? { value } : {}) })
      }
      const limit = vals(1)?.[0]
      if (s?.[0] === 0 && dl?.[0] === 1 && limit !== undefined) return one({ dims: [limit] })
      return one({ dims: [env.fresh()] })
    }
    case "Transpose": {
      const d = dims(0)
      if (d === undefined) return one(undefined)
      const perm = attrInts("perm") ?? d.map((_, i) => d.length - 1 - i)
      return one({ dims: perm.map((p) => d[p]) })
    }
    case "MatMul": {
      const a = dims(0)
      const b = dims(1)
      if (a === undefined || b === undefined) return one(undefined)
      if (a.length === 1 && b.length === 1) return one({ dims: [] })
      if (a.length === 1) return one({ dims: [...b.slice(0, -2), b[b.length - 1]] })
      if (b.length === 1) return one({ dims: a.slice(0, -1) })
      const batch = bcast([a.slice(0, -2), b.slice(0, -2)], env)!
      return one({ dims: [...batch, a[a.length - 2], b[b.length - 1]] })
    }
    case "Gemm": {
      const a = dims(0)
      const b = dims(1)
      if (a === undefined || b === undefined) return one({ dims: [env.fresh(), env.fresh()] })
      return one({ dims: [attrInt("transA", 0) ? a[1] : a[0], attrInt("transB", 0) ? b[0] : b[1]] })
    }
    case "Slice": {
      const d = dims(0)
      if (d === undefined) return one(undefined)
      const starts = nums(1)
      const ends = nums(2)
      const axes = has(3) ? nums(3) : d.map((_, i) => i).slice(0, starts?.length ?? ends?.length ?? d.length)
      const steps = has(4) ? nums(4) : undefined
      if (axes === undefined) return one({ dims: freshDims(d.length) })
      const out = [...d]
      axes.forEach((ax, k) => {
        const a = normAxis(ax, d.length)
        const s = starts?.[k]
        const e = ends?.[k]
        const st = has(4) ? steps?.[k] : 1
        const dim = d[a]
        if (s !== undefined && e !== undefined && st !== undefined && isNum(dim)) out[a] = sliceLen(dim, s, e, st)
        else if (s === 0 && e !== undefined && e >= BIG / 4 && st === 1) out[a] = dim
        else out[a] = env.fresh()
      })
      const v = vals(0)
      let value: ReadonlyArray<SDim> | undefined
      if (d.length === 1 && v !== undefined && starts && ends && (steps === undefined || steps.length > 0)) {
        value = sliceValues(v, starts[0], ends[0], has(4) ? steps?.[0] ?? 1 : 1)
      }
      return one({ dims: out, ...(value ? { value } : {}) })
    }
    case "Split": {
      const d = dims(0)
      if (d === undefined) return node.outputs.map(() => undefined)
      const a = normAxis(attrInt("axis", 0), d.length)
      const sizes = opset >= 13 ? (has(1) ? nums(1) : undefined) : attrInts("split")
      const n = node.outputs.length
      return node.outputs.map((_, k) => {
        const out = [...d]
        const dim = d[a]
        out[a] = sizes?.[k] ?? (isNum(dim) && !has(1) && dim % n === 0 ? dim / n : env.fresh())
        return { dims: out }
      })
    }
    case "ReduceSum":
    case "ReduceMean":
    case "ReduceMax":
    case "ReduceMin":
    case "ReduceProd":
    case "ReduceL1":
    case "ReduceL2":
    case "ReduceLogSum":
    case "ReduceLogSumExp":
    case "ReduceSumSquare":
    case "ArgMax":
    case "ArgMin": {
      const d = dims(0)
      if (d === undefined) return one(undefined)
      const keep = attrInt("keepdims", 1) === 1
      const isArg = op === "ArgMax" || op === "ArgMin"
      const fromInput = !isArg && reduceAxesFromInput(op, opset)
      let axes: ReadonlyArray<number> | undefined
      if (isArg) axes = [attrInt("axis", 0)]
      else if (fromInput) {
        if (has(1)) {
          axes = nums(1)
          if (axes === undefined) return one(keep ? { dims: freshDims(d.length) } : undefined)
        }
      } else axes = attrInts("axes")
      if (axes !== undefined && axes.length === 0 && attrInt("noop_with_empty_axes", 0) === 1) return one({ dims: d })
      const norm = axes === undefined || axes.length === 0 ? d.map((_, i) => i) : axes.map((a) => normAxis(a, d.length))
      return one({ dims: keep ? d.map((x, i) => (norm.includes(i) ? 1 : x)) : d.filter((_, i) => !norm.includes(i)) })
    }
    case "GatherElements":
      return one(dims(1) ? { dims: dims(1)! } : undefined)
    case "NonZero": {
      const d = dims(0)
      return one(d ? { dims: [d.length, env.fresh()] } : undefined)
    }
    case "TopK": {
      const d = dims(0)
      if (d === undefined) return node.outputs.map(() => undefined)
      const a = normAxis(attrInt("axis", -1), d.length)
      const k = nums(1)?.[0]
      const out = d.map((x, i) => (i === a ? k ?? env.fresh() : x))
      return node.outputs.map(() => ({ dims: out }))
    }
    case "Tile": {
      const d = dims(0)
      const reps = vals(1)
      if (d === undefined) return one(undefined)
      return one({ dims: d.map((x, i) => (reps && isNum(reps[i]) ? (reps[i] === 1 ? x : isNum(x) ? x * (reps[i] as number) : env.fresh()) : env.fresh())) })
    }
    case "Pad": {
      const d = dims(0)
      if (d === undefined) return one(undefined)
      const pads = nums(1)
      const axes = has(3) ? nums(3) : d.map((_, i) => i)
      if (pads === undefined || axes === undefined) return one({ dims: freshDims(d.length) })
      const out = [...d]
      axes.forEach((ax, k) => {
        const a = normAxis(ax, d.length)
        const add = pads[k] + pads[k + axes.length]
        out[a] = add === 0 ? d[a] : isNum(d[a]) ? (d[a] as number) + add : env.fresh()
      })
      return one({ dims: out })
    }
    case "If": {
      const g = Onnx.attrGraph(node, "then_branch")
      const h = Onnx.attrGraph(node, "else_branch")
      if (g === undefined || h === undefined) return node.outputs.map(() => undefined)
      const a = inferGraph(g, env.child(), opset)
      const b = inferGraph(h, env.child(), opset)
      return node.outputs.map((_, k) => {
        const da = a.get(g.outputs[k]?.name ?? "")?.dims
        const db = b.get(h.outputs[k]?.name ?? "")?.dims
        if (da === undefined || db === undefined || da.length !== db.length) return undefined
        return { dims: da.map((x, i) => (x === db[i] ? x : env.fresh())) }
      })
    }
    default:
      return node.outputs.map(() => undefined)
  }
}

/** Infers static info for a graph's tensors into `env` (which may see outer scopes). */
const inferGraph = (graph: Onnx.Graph, env: ShapeEnv, opset: number): ShapeEnv => {
  for (const t of graph.initializers) env.set(t.name, tensorInfo(t))
  for (const v of graph.inputs) if (env.get(v.name) === undefined) env.set(v.name, declaredInfo(v, env.fresh()))
  for (const node of graph.nodes) {
    let infos: ReadonlyArray<Info | undefined>
    try {
      infos = inferNode(node, env, opset)
    } catch {
      infos = node.outputs.map(() => undefined)
    }
    node.outputs.forEach((o, k) => {
      if (infos[k]?.dims !== undefined || env.get(o) === undefined) env.set(o, infos[k])
    })
  }
  return env
}

/**
 * The static analysis {@link backward} runs: for each tensor whose rank it
 * finds, its dims (numbers, or symbols: `$param` for a declared symbolic dim,
 * `?k` for a derived one; equal symbols are equal sizes), and the values of
 * small integer tensors (shapes, axes).
 *
 * @example
 * Autodiff.analyze(model).get("/model/layers.0/Add_1_output_0")?.dims // ["$batch_size", "$sequence_length", 64]
 *
 * @since 0.1.0
 */
export const analyze = (model: Onnx.Model): ReadonlyMap<string, Info> => {
  const env = inferGraph(model.graph, new ShapeEnv(undefined, { n: 0 }), Number(Onnx.opsetVersion(model) ?? 17n))
  const out = new Map<string, Info>()
  const names = new Set<string>()
  allNames(model.graph, names)
  for (const n of names) {
    const i = env.get(n)
    if (i !== undefined) out.set(n, i)
  }
  return out
}

/**
 * The statically known dims of every tensor of a model (see {@link analyze}),
 * in the form {@link BackwardOptions.shapes} takes: pass the whole model's
 * to `backward` of each of its segments, whose inputs declare no shapes.
 *
 * @example
 * const shapes = Autodiff.staticShapes(model)
 * Autodiff.backward(Segments.toModel(index, segment), { outputs, wrt, shapes })
 *
 * @since 0.1.0
 */
export const staticShapes = (model: Onnx.Model): Readonly<Record<string, ReadonlyArray<number | string>>> => {
  const out: Record<string, ReadonlyArray<number | string>> = {}
  for (const [name, info] of analyze(model)) if (info.dims !== undefined) out[name] = info.dims
  return out
}

// ---------------------------------------------------------------------------
// Emission context
// ---------------------------------------------------------------------------

const FLOAT_CODES = new Set<number>([DType.OnnxCode.FLOAT, DType.OnnxCode.DOUBLE, DType.OnnxCode.FLOAT16, DType.OnnxCode.BFLOAT16])

/**
 * Whether an ONNX element type carries gradients (floating point).
 *
 * @since 0.1.0
 */
export const isDifferentiable = (elemType: number | undefined): boolean => elemType !== undefined && FLOAT_CODES.has(elemType)

interface Scope {
  readonly b: OnnxBuilder.Builder
  readonly parent: Scope | undefined
  readonly opset: number
  readonly prefix: string
  readonly types: Map<string, number>
  readonly env: ShapeEnv
  /** forward initializers by name (this scope and outer ones) */
  readonly inits: ReadonlyMap<string, Onnx.TensorProto>
  /** forward producers (this scope and outer ones) */
  readonly producers: ReadonlyMap<string, Onnx.Node>
  readonly consts: Map<string, string>
  readonly shapes: Map<string, string>
  /** symbol -> a backward tensor of this scope with that dim, and the axis */
  readonly sources: Map<string, readonly [string, number]>
}

const lookup = <V>(s: Scope | undefined, f: (s: Scope) => V | undefined): V | undefined => {
  for (let c = s; c !== undefined; c = c.parent) {
    const v = f(c)
    if (v !== undefined) return v
  }
  return undefined
}

/**
 * What a gradient rule gets: the forward node, the gradients of its outputs
 * (`undefined`: none flows), which inputs need gradients, and emitters that
 * write ONNX nodes into the backward graph. Forward tensors are referred to by
 * their names (`x(k)`, `y(k)`); the backward model receives the ones it
 * reads as inputs.
 *
 * @since 0.1.0
 */
export interface Ctx {
  readonly node: Onnx.Node
  readonly opset: number
  readonly gy: ReadonlyArray<string | undefined>
  readonly needs: ReadonlyArray<boolean>
  /** Outer-scope tensors a node's subgraphs read that need gradients (If). */
  readonly outerNeeds: ReadonlyArray<string>
  /** Name of forward input `k` ("" when omitted). */
  x(k: number): string
  /** Name of forward output `k`. */
  y(k: number): string
  has(k: number): boolean
  /** Emits a node with one output; numbers are FLOAT attributes, bigints INT. */
  op(opType: string, inputs: ReadonlyArray<string>, attributes?: Readonly<Record<string, Onnx.AttributeValue>> | ReadonlyArray<Onnx.Attribute>): string
  /** Emits a node with `outputs` outputs. */
  opN(opType: string, inputs: ReadonlyArray<string>, outputs: number, attributes?: Readonly<Record<string, Onnx.AttributeValue>> | ReadonlyArray<Onnx.Attribute>): ReadonlyArray<string>
  /** A 1-D int64 constant. */
  ints(values: ReadonlyArray<number | bigint>): string
  /** A scalar int64 constant. */
  int(value: number | bigint): string
  /** A scalar constant of the element type of tensor `like`. */
  scalar(value: number, like: string): string
  elemType(name: string): number
  /** Static rank, or an {@link UnsupportedGradient} error. */
  rank(name: string): number
  dims(name: string): ReadonlyArray<SDim> | undefined
  /** Static values of a small integer tensor (axes, sizes), when known numerically. */
  constInts(name: string): ReadonlyArray<number> | undefined
  /** A scalar float constant's value (Constant node or initializer), when known. */
  constFloat(name: string): number | undefined
  /** The shape (1-D int64) of forward tensor `name`. */
  shape(name: string): string
  /** Dimension `axis` of forward tensor `name`, as a 1-D int64 of length 1. */
  dim(name: string, axis: number): string
  /** Sums `grad` (whose dims are `gradDims`, default those of output 0) down to the shape of forward tensor `input`. */
  unbroadcast(grad: string, input: string, gradDims?: ReadonlyArray<SDim>): string
  /** Reshape to a run-time shape (zeros in it are sizes, not "copy": `allowzero` from opset 14). */
  reshapeTo(x: string, shape: string): string
  /** Zeros of the shape and element type of forward tensor `name`. */
  zerosLike(name: string): string
  /** A reduction with axes given statically, as a runtime tensor, or all. */
  reduce(opType: string, x: string, axes: ReadonlyArray<number> | string | undefined, keepdims: boolean): string
  unsqueeze(x: string, axes: ReadonlyArray<number> | string): string
  squeeze(x: string, axes: ReadonlyArray<number>): string
  /** Adds a gradient contribution for an outer-scope tensor. */
  accumulate(name: string, grad: string): void
  /** Builds a subgraph (If branch) that recomputes `graph` and returns gradients of `targets` given seeds for its outputs. */
  branch(name: string, graph: Onnx.Graph, seeds: ReadonlyMap<string, string>, targets: ReadonlyArray<string>): Onnx.Graph
  fail(reason: string): never
}

/**
 * A gradient rule: input gradients (`undefined`: none) of one forward node.
 *
 * @since 0.1.0
 */
export type GradRule = (c: Ctx) => ReadonlyArray<string | undefined>

const attrsOf = (
  a: Readonly<Record<string, Onnx.AttributeValue>> | ReadonlyArray<Onnx.Attribute> | undefined
): ReadonlyArray<Onnx.Attribute> =>
  a === undefined
    ? []
    : Array.isArray(a)
    ? (a as ReadonlyArray<Onnx.Attribute>)
    : Object.entries(a as Readonly<Record<string, Onnx.AttributeValue>>).map(([k, v]) => Onnx.attribute(k, v))

const emit = (
  s: Scope,
  base: string,
  opType: string,
  inputs: ReadonlyArray<string>,
  outputs: number,
  attributes?: Readonly<Record<string, Onnx.AttributeValue>> | ReadonlyArray<Onnx.Attribute>
): ReadonlyArray<string> => {
  const name = s.b.freshNode(`${s.prefix}${base}/${opType}`)
  return s.b.node(opType, inputs, { name, outputs, attributes: attrsOf(attributes) })
}

const scalarTensor = (value: number, elemType: number): Onnx.TensorProto | undefined => {
  switch (elemType) {
    case DType.OnnxCode.FLOAT:
      return Onnx.makeTensor("", "float32", [], Float32Array.of(value))
    case DType.OnnxCode.DOUBLE:
      return Onnx.makeTensor("", "float64", [], Float64Array.of(value))
    case DType.OnnxCode.INT64:
      return Onnx.makeTensor("", "int64", [], BigInt64Array.of(BigInt(value)))
    case DType.OnnxCode.INT32:
      return Onnx.makeTensor("", "int32", [], Int32Array.of(value))
    default:
      return undefined
  }
}

const makeCtx = (s: Scope, node: Onnx.Node, gy: ReadonlyArray<string | undefined>, needs: ReadonlyArray<boolean>, outerNeeds: ReadonlyArray<string>, accumulate: (name: string, grad: string) => void): Ctx => {
  const base = node.name !== "" ? node.name : node.opType
  const fail = (reason: string): never => {
    throw new UnsupportedGradient({ opType: node.opType, node: node.name, reason })
  }
  const elemType = (name: string): number => {
    const t = s.types.get(name)
    if (t === undefined) return fail(`unknown element type of tensor "${name}"`)
    return t
  }
  const constant = (key: string, make: () => Onnx.TensorProto): string => {
    const hit = lookup(s, (c) => c.consts.get(key))
    if (hit !== undefined) return hit
    const out = emit(s, "const", "Constant", [], 1, [Onnx.tensorAttribute("value", make())])[0]
    s.consts.set(key, out)
    return out
  }
  const ints = (values: ReadonlyArray<number | bigint>): string =>
    constant(`i64[${values.join(",")}]`, () => Onnx.makeTensor("", "int64", [values.length], BigInt64Array.from(values.map((v) => BigInt(v)))))
  const int = (value: number | bigint): string =>
    constant(`i64(${value})`, () => Onnx.makeTensor("", "int64", [], BigInt64Array.of(BigInt(value))))
  const op1 = (opType: string, inputs: ReadonlyArray<string>, attributes?: Readonly<Record<string, Onnx.AttributeValue>> | ReadonlyArray<Onnx.Attribute>) =>
    emit(s, base, opType, inputs, 1, attributes)[0]
  const scalarOfType = (value: number, t: number): string => {
    const direct = scalarTensor(value, t)
    if (direct !== undefined) return constant(`s${t}(${value})`, () => direct)
    const hit = lookup(s, (c) => c.consts.get(`s${t}(${value})`))
    if (hit !== undefined) return hit
    const f = constant(`s1(${value})`, () => scalarTensor(value, DType.OnnxCode.FLOAT)!)
    const out = op1("Cast", [f], { to: BigInt(t) })
    s.consts.set(`s${t}(${value})`, out)
    return out
  }
  const dims = (name: string) => s.env.get(name)?.dims
  const rank = (name: string): number => {
    const d = dims(name)
    if (d === undefined) return fail(`the rank of tensor "${name}" is not statically known`)
    return d.length
  }
  const constInts = (name: string): ReadonlyArray<number> | undefined => {
    const v = s.env.get(name)?.value
    return v !== undefined && allNum(v) ? v : undefined
  }
  const constFloat = (name: string): number | undefined => {
    const t = lookup(s, (c) => c.inits.get(name)) ?? (() => {
      const p = lookup(s, (c) => c.producers.get(name))
      return p?.opType === "Constant" ? Onnx.attrTensor(p, "value") : undefined
    })()
    if (t === undefined) {
      const p = lookup(s, (c) => c.producers.get(name))
      return p?.opType === "Constant" ? Onnx.attrFloat(p, "value_float") : undefined
    }
    if (Onnx.elementCount(t.dims) !== 1) return undefined
    try {
      return Number((Onnx.tensorData(t) as ArrayLike<number | bigint>)[0])
    } catch {
      return undefined
    }
  }
  const source = (sym: string) => lookup(s, (c) => c.sources.get(sym))
  const shapeOfBackward = (name: string): string => {
    const hit = lookup(s, (c) => c.shapes.get(name))
    if (hit !== undefined) return hit
    const out = op1("Shape", [name])
    s.shapes.set(name, out)
    return out
  }
  const shape = (name: string): string => {
    const key = `fwd:${name}`
    const hit = lookup(s, (c) => c.shapes.get(key))
    if (hit !== undefined) return hit
    const d = dims(name)
    let out: string
    if (d !== undefined && allNum(d)) out = ints(d)
    else if (d !== undefined && d.every((x) => isNum(x) || source(x) !== undefined)) {
      const parts: Array<string> = []
      for (const x of d) {
        if (isNum(x)) parts.push(ints([x]))
        else {
          const [src, axis] = source(x)!
          parts.push(op1("Gather", [shapeOfBackward(src), ints([axis])], { axis: 0n }))
        }
      }
      out = parts.length === 1 ? parts[0] : op1("Concat", parts, { axis: 0n })
      if (parts.length === 0) out = ints([])
    } else out = op1("Shape", [name])
    s.shapes.set(key, out)
    return out
  }
  const dim = (name: string, axis: number): string => {
    const d = dims(name)
    if (d !== undefined) {
      const a = normAxis(axis, d.length)
      const x = d[a]
      if (isNum(x)) return ints([x])
      const src = source(x)
      if (src !== undefined) return op1("Gather", [shapeOfBackward(src[0]), ints([src[1]])], { axis: 0n })
    }
    return op1("Gather", [shape(name), ints([axis])], { axis: 0n })
  }
  const reduce = (opType: string, x: string, axes: ReadonlyArray<number> | string | undefined, keepdims: boolean): string => {
    const kd = { keepdims: keepdims ? 1n : 0n }
    if (axes === undefined) return op1(opType, [x], kd)
    if (typeof axes !== "string" && axes.length === 0) return x
    if (reduceAxesFromInput(opType, s.opset)) {
      return op1(opType, [x, typeof axes === "string" ? axes : ints(axes)], typeof axes === "string" ? { ...kd, noop_with_empty_axes: 1n } : kd)
    }
    if (typeof axes === "string") {
      const v = constInts(axes)
      if (v === undefined) return fail(`${opType} with run-time axes needs opset 18 (model has ${s.opset})`)
      axes = v
      if (axes.length === 0) return x
    }
    return op1(opType, [x], [Onnx.intAttribute("keepdims", keepdims ? 1n : 0n), Onnx.intsAttribute("axes", axes)])
  }
  const unsqueeze = (x: string, axes: ReadonlyArray<number> | string): string => {
    if (typeof axes !== "string" && axes.length === 0) return x
    if (s.opset >= 13) return op1("Unsqueeze", [x, typeof axes === "string" ? axes : ints(axes)])
    if (typeof axes === "string") return fail("run-time axes need opset 13")
    return op1("Unsqueeze", [x], [Onnx.intsAttribute("axes", axes)])
  }
  const squeeze = (x: string, axes: ReadonlyArray<number>): string => {
    if (axes.length === 0) return x
    if (s.opset >= 13) return op1("Squeeze", [x, ints(axes)])
    return op1("Squeeze", [x], [Onnx.intsAttribute("axes", axes)])
  }
  // Shapes read at run time may hold zeros (empty tensors): allowzero keeps them literal.
  const reshapeTo = (x: string, shape: string): string =>
    op1("Reshape", [x, shape], s.opset >= 14 ? { allowzero: 1n } : {})
  const unbroadcast = (grad: string, input: string, gradDims?: ReadonlyArray<SDim>): string => {
    const gd = gradDims ?? dims(node.outputs[0])
    const xd = dims(input)
    if (gd !== undefined && xd !== undefined && gd.length >= xd.length) {
      const lead = gd.length - xd.length
      const aligned: Array<number> = []
      let known = true
      xd.forEach((x, i) => {
        const g = gd[lead + i]
        if (x === g) return
        if (x === 1) aligned.push(lead + i)
        else if (isNum(x)) return
        else known = false
      })
      if (known) {
        let out = grad
        if (aligned.length > 0) out = reduce("ReduceSum", out, aligned, true)
        if (lead > 0) out = reduce("ReduceSum", out, Array.from({ length: lead }, (_, i) => i), false)
        return out
      }
    }
    const sx = shape(input)
    let padded: string
    if (gd !== undefined && xd !== undefined) {
      const lead = gd.length - xd.length
      padded = lead > 0 ? op1("Concat", [ints(new Array(lead).fill(1)), sx], { axis: 0n }) : sx
    } else {
      const lead = op1("Sub", [op1("Shape", [shapeOfBackward(grad)]), op1("Shape", [sx])])
      const ones = op1("ConstantOfShape", [lead], { value: Onnx.makeTensor("", "int64", [1], BigInt64Array.of(1n)) })
      padded = op1("Concat", [ones, sx], { axis: 0n })
    }
    const axes = op1("Reshape", [op1("NonZero", [op1("Equal", [padded, ints([1])])]), ints([-1])])
    const summed = op1("ReduceSum", [grad, axes], { keepdims: 1n, noop_with_empty_axes: 1n })
    return reshapeTo(summed, sx)
  }
  const zerosLike = (name: string): string => {
    const t = elemType(name)
    const z = scalarTensor(0, t)
    if (z !== undefined) {
      return op1("ConstantOfShape", [shape(name)], { value: { ...z, dims: [1] } })
    }
    const f = op1("ConstantOfShape", [shape(name)], { value: { ...scalarTensor(0, DType.OnnxCode.FLOAT)!, dims: [1] } })
    return op1("Cast", [f], { to: BigInt(t) })
  }
  const ctx: Ctx = {
    node,
    opset: s.opset,
    gy,
    needs,
    outerNeeds,
    x: (k) => node.inputs[k] ?? "",
    y: (k) => node.outputs[k],
    has: (k) => node.inputs[k] !== undefined && node.inputs[k] !== "",
    op: op1,
    opN: (opType, inputs, outputs, attributes) => emit(s, base, opType, inputs, outputs, attributes),
    ints,
    int,
    scalar: (value, like) => scalarOfType(value, s.types.get(like) ?? elemType(like)),
    elemType,
    rank,
    dims,
    constInts,
    constFloat,
    shape,
    dim,
    unbroadcast,
    reshapeTo,
    zerosLike,
    reduce,
    unsqueeze,
    squeeze,
    accumulate,
    branch: (name, graph, seeds, targets) => branchGraph(s, name, graph, seeds, targets),
    fail
  }
  return ctx
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

const none: GradRule = () => []

const unary =
  (f: (c: Ctx, g: string) => string): GradRule =>
  (c) =>
    c.gy[0] === undefined || !c.needs[0] ? [] : [f(c, c.gy[0])]

const passThrough: GradRule = unary((_, g) => g)

const reshapeBack: GradRule = unary((c, g) => c.reshapeTo(g, c.shape(c.x(0))))

const axisAttr = (c: Ctx, dflt: number): number => Number(Onnx.attrInt(c.node, "axis") ?? BigInt(dflt))

/** Swaps the last two axes (rank >= 2). */
const swapLast = (c: Ctx, x: string, rank: number): string => {
  const perm = Array.from({ length: rank }, (_, i) => BigInt(i))
  perm[rank - 1] = BigInt(rank - 2)
  perm[rank - 2] = BigInt(rank - 1)
  return c.op("Transpose", [x], { perm })
}

const replaceLast = (d: ReadonlyArray<SDim> | undefined, last: SDim | undefined): ReadonlyArray<SDim> | undefined =>
  d === undefined || last === undefined ? undefined : [...d.slice(0, -1), last]

const matmulRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const A = c.x(0)
  const B = c.x(1)
  const ra = c.rank(A)
  const rb = c.rank(B)
  const ad = c.dims(A)
  const bd = c.dims(B)
  const yd = c.dims(c.y(0))
  let gA: string | undefined
  let gB: string | undefined
  if (ra === 1 && rb === 1) {
    if (c.needs[0]) gA = c.op("Mul", [g, B])
    if (c.needs[1]) gB = c.op("Mul", [g, A])
  } else if (ra === 1) {
    // y[..., n] = sum_k A[k] B[..., k, n]
    if (c.needs[0]) {
      const t = c.op("MatMul", [B, c.unsqueeze(g, [-1])]) // [..., k, 1]
      const lead = Array.from({ length: rb - 2 }, (_, i) => i)
      gA = c.op("Reshape", [c.reduce("ReduceSum", t, lead, false), c.ints([-1])])
    }
    if (c.needs[1]) gB = c.op("Mul", [c.unsqueeze(A, [-1]), c.unsqueeze(g, [-2])])
  } else if (rb === 1) {
    // y[..., m] = sum_k A[..., m, k] B[k]
    if (c.needs[0]) gA = c.op("Mul", [c.unsqueeze(g, [-1]), B])
    if (c.needs[1]) {
      const t = c.op("MatMul", [c.unsqueeze(g, [-2]), A]) // [..., 1, k]
      gB = c.op("Reshape", [c.reduce("ReduceSum", t, Array.from({ length: ra - 1 }, (_, i) => i), false), c.ints([-1])])
    }
  } else {
    if (c.needs[0]) {
      const t = c.op("MatMul", [g, swapLast(c, B, rb)])
      gA = c.unbroadcast(t, A, replaceLast(yd, ad?.[ad.length - 1]))
    }
    if (c.needs[1]) {
      if (rb === 2 && ra > 2) {
        // Linear layer: fold the batch axes into one, one Gemm gives [k, n].
        // Flatten, not Reshape to [-1, k]: -1 is ambiguous when k is 0.
        const a2 = c.op("Flatten", [A], { axis: BigInt(ra - 1) })
        const g2 = c.op("Flatten", [g], { axis: BigInt(ra - 1) })
        gB = c.op("Gemm", [a2, g2], { transA: 1n })
      } else {
        const t = c.op("MatMul", [swapLast(c, A, ra), g])
        const kd = ad?.[ad.length - 1]
        const nd = yd?.[yd.length - 1]
        const td = yd === undefined || kd === undefined || nd === undefined ? undefined : [...yd.slice(0, -2), kd, nd]
        gB = c.unbroadcast(t, B, td)
      }
    }
  }
  return [gA, gB]
}

const gemmRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const A = c.x(0)
  const B = c.x(1)
  const transA = Number(Onnx.attrInt(c.node, "transA") ?? 0n)
  const transB = Number(Onnx.attrInt(c.node, "transB") ?? 0n)
  const alpha = Onnx.attrFloat(c.node, "alpha") ?? 1
  const beta = Onnx.attrFloat(c.node, "beta") ?? 1
  let gA: string | undefined
  let gB: string | undefined
  let gC: string | undefined
  if (c.needs[0]) {
    gA = transA
      ? c.op("Gemm", [B, g], { transA: BigInt(transB), transB: 1n, alpha })
      : c.op("Gemm", [g, B], { transA: 0n, transB: BigInt(1 - transB), alpha })
  }
  if (c.needs[1]) {
    gB = transB
      ? c.op("Gemm", [g, A], { transA: 1n, transB: BigInt(transA), alpha })
      : c.op("Gemm", [A, g], { transA: BigInt(1 - transA), transB: 0n, alpha })
  }
  if (c.has(2) && c.needs[2]) {
    const scaled = beta === 1 ? g : c.op("Mul", [g, c.scalar(beta, g)])
    gC = c.unbroadcast(scaled, c.x(2))
  }
  return [gA, gB, gC]
}

const addRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  return [c.needs[0] ? c.unbroadcast(g, c.x(0)) : undefined, c.needs[1] ? c.unbroadcast(g, c.x(1)) : undefined]
}

const subRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  return [c.needs[0] ? c.unbroadcast(g, c.x(0)) : undefined, c.needs[1] ? c.op("Neg", [c.unbroadcast(g, c.x(1))]) : undefined]
}

const mulRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  return [
    c.needs[0] ? c.unbroadcast(c.op("Mul", [g, c.x(1)]), c.x(0)) : undefined,
    c.needs[1] ? c.unbroadcast(c.op("Mul", [g, c.x(0)]), c.x(1)) : undefined
  ]
}

const divRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const b = c.x(1)
  return [
    c.needs[0] ? c.unbroadcast(c.op("Div", [g, b]), c.x(0)) : undefined,
    c.needs[1] ? c.op("Neg", [c.unbroadcast(c.op("Div", [c.op("Mul", [g, c.y(0)]), b]), b)]) : undefined
  ]
}

const powRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const x = c.x(0)
  const p = c.x(1)
  const tx = c.elemType(x)
  let gx: string | undefined
  let gp: string | undefined
  const pc = c.elemType(p) === tx ? p : c.op("Cast", [p], { to: BigInt(tx) })
  if (c.needs[0]) {
    const pv = c.constFloat(p)
    let d: string
    if (pv === 2) d = c.op("Mul", [x, c.scalar(2, x)])
    else if (pv === 1) d = ""
    else if (pv !== undefined && pv !== 0) d = c.op("Mul", [c.op("Pow", [x, c.scalar(pv - 1, x)]), c.scalar(pv, x)])
    else if (pv === 0) d = "0"
    else {
      const raw = c.op("Mul", [pc, c.op("Pow", [x, c.op("Sub", [pc, c.scalar(1, x)])])])
      d = c.op("Where", [c.op("Equal", [pc, c.scalar(0, x)]), c.scalar(0, x), raw])
    }
    if (d !== "0") gx = c.unbroadcast(d === "" ? g : c.op("Mul", [g, d]), x)
  }
  if (c.needs[1]) {
    const t = c.op("Mul", [g, c.op("Mul", [c.y(0), c.op("Log", [x])])])
    const mask = c.op("And", [c.op("Equal", [x, c.scalar(0, x)]), c.op("GreaterOrEqual", [pc, c.scalar(0, x)])])
    const masked = c.op("Where", [mask, c.scalar(0, x), t])
    const r = c.unbroadcast(masked, p)
    gp = c.elemType(p) === tx ? r : c.op("Cast", [r], { to: BigInt(c.elemType(p)) })
  }
  return [gx, gp]
}

const softmaxRule: GradRule = unary((c, g) => {
  const y = c.y(0)
  const axis = axisAttr(c, -1)
  const s = c.reduce("ReduceSum", c.op("Mul", [g, y]), [axis], true)
  return c.op("Mul", [y, c.op("Sub", [g, s])])
})

const logSoftmaxRule: GradRule = unary((c, g) => {
  const axis = axisAttr(c, -1)
  const s = c.reduce("ReduceSum", g, [axis], true)
  return c.op("Sub", [g, c.op("Mul", [c.op("Exp", [c.y(0)]), s])])
})

/** Axes normalized by LayerNormalization-style `axis`: [axis, rank). */
const normAxes = (c: Ctx, x: string): ReadonlyArray<number> => {
  const axis = axisAttr(c, -1)
  if (axis < 0) return Array.from({ length: -axis }, (_, i) => axis + i)
  const r = c.rank(x)
  return Array.from({ length: r - axis }, (_, i) => axis + i)
}

const layerNormRule =
  (centered: boolean): GradRule =>
  (c) => {
    const g = c.gy[0]
    if (c.gy.slice(1).some((v) => v !== undefined)) c.fail("gradients through the mean / inverse standard deviation outputs are not supported")
    if (g === undefined) return []
    const x = c.x(0)
    const scale = c.x(1)
    const eps = Onnx.attrFloat(c.node, "epsilon") ?? 1e-5
    const axes = normAxes(c, x)
    const mean = (t: string) => c.reduce("ReduceMean", t, axes, true)
    const xc = centered ? c.op("Sub", [x, mean(x)]) : x
    const v = mean(c.op("Mul", [xc, xc]))
    const rstd = c.op("Reciprocal", [c.op("Sqrt", [c.op("Add", [v, c.scalar(eps, x)])])])
    const xhat = c.op("Mul", [xc, rstd])
    let gx: string | undefined
    if (c.needs[0]) {
      const gh = c.op("Mul", [g, scale])
      let inner = c.op("Sub", [gh, c.op("Mul", [xhat, mean(c.op("Mul", [gh, xhat]))])])
      if (centered) inner = c.op("Sub", [inner, mean(gh)])
      gx = c.op("Mul", [rstd, inner])
    }
    const gs = c.needs[1] ? c.unbroadcast(c.op("Mul", [g, xhat]), scale) : undefined
    const gb = centered && c.has(2) && c.needs[2] ? c.unbroadcast(g, c.x(2)) : undefined
    return [gx, gs, gb]
  }

const transposeRule: GradRule = unary((c, g) => {
  const perm = Onnx.attrInts(c.node, "perm")?.map(Number) ?? (() => {
    const r = c.rank(c.x(0))
    return Array.from({ length: r }, (_, i) => r - 1 - i)
  })()
  const inv = new Array<bigint>(perm.length)
  perm.forEach((p, i) => (inv[p] = BigInt(i)))
  return c.op("Transpose", [g], { perm: inv })
})

/** Integer indices normalized to [0, n): int64, negatives wrapped (`n` a 1-D int64 of length 1). */
const normIndices = (c: Ctx, idx: string, n: string): string => {
  const i64 = c.elemType(idx) === DType.OnnxCode.INT64 ? idx : c.op("Cast", [idx], { to: BigInt(DType.OnnxCode.INT64) })
  return c.op("Where", [c.op("Less", [i64, c.int(0)]), c.op("Add", [i64, c.op("Reshape", [n, c.ints([])])]), i64])
}

const gatherRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined || !c.needs[0]) return []
  const data = c.x(0)
  const idx = c.x(1)
  const axis = axisAttr(c, 0)
  const r = axis === 0 ? c.dims(data)?.length ?? 1 : c.rank(data)
  const a = normAxis(axis, r)
  const q = a === 0 ? 0 : c.rank(idx)
  const n = c.dim(data, a) // [1]
  const ii = normIndices(c, idx, n)
  // Move the gathered axis of data first: data' = [N, P..., Q...]; g' = [I..., P..., Q...]
  const permD = [a, ...Array.from({ length: a }, (_, i) => i), ...Array.from({ length: r - a - 1 }, (_, i) => a + 1 + i)]
  const shapeD = a === 0 ? c.shape(data) : c.op("Gather", [c.shape(data), c.ints(permD)], { axis: 0n })
  const gT =
    a === 0
      ? g
      : c.op("Transpose", [g], {
          perm: [
            ...Array.from({ length: q }, (_, i) => a + i),
            ...Array.from({ length: a }, (_, i) => i),
            ...Array.from({ length: r - a - 1 }, (_, i) => a + q + i)
          ].map(BigInt)
        })
  let out: string
  if (c.opset >= 16) {
    const zeros = c.op("ConstantOfShape", [shapeD], { value: { ...scalarOrFloat(c, g), dims: [1] } })
    const z = c.elemType(g) === DType.OnnxCode.BFLOAT16 || c.elemType(g) === DType.OnnxCode.FLOAT16 ? c.op("Cast", [zeros], { to: BigInt(c.elemType(g)) }) : zeros
    out = c.op("ScatterND", [z, c.unsqueeze(ii, [-1]), gT], { reduction: "add" })
  } else {
    const rest = c.op("Slice", [shapeD, c.ints([1]), c.ints([BIG])])
    const k = c.reduce("ReduceProd", rest, undefined, true) // [1]
    const idxF = c.op("Reshape", [ii, c.ints([-1, 1])])
    // the row count spelled out: a -1 beside k = 0 would be ambiguous
    const rows = c.reduce("ReduceProd", c.shape(ii), undefined, true)
    const gF = c.op("Reshape", [gT, c.op("Concat", [rows, k], { axis: 0n })])
    const range = c.op("Range", [c.int(0), c.op("Squeeze", [n, c.ints([0])]), c.int(1)])
    const oneHot = c.op("Cast", [c.op("Equal", [idxF, range])], { to: BigInt(c.elemType(g)) })
    out = c.reshapeTo(c.op("Gemm", [oneHot, gF], { transA: 1n }), shapeD)
  }
  if (a === 0) return [out]
  const inv = new Array<bigint>(r)
  permD.forEach((p, i) => (inv[p] = BigInt(i)))
  return [c.op("Transpose", [out], { perm: inv })]
}

const scalarOrFloat = (c: Ctx, like: string): Onnx.TensorProto =>
  scalarTensor(0, c.elemType(like)) ?? scalarTensor(0, DType.OnnxCode.FLOAT)!

const gatherElementsRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined || !c.needs[0]) return []
  const data = c.x(0)
  const axis = axisAttr(c, 0)
  const n = c.dim(data, axis)
  const ii = normIndices(c, c.x(1), n)
  if (c.opset >= 16) {
    return [c.op("ScatterElements", [c.zerosLike(data), ii, g], { axis: BigInt(axis), reduction: "add" })]
  }
  const r = c.rank(data)
  const a = normAxis(axis, r)
  const range = c.op("Range", [c.int(0), c.op("Squeeze", [n, c.ints([0])]), c.int(1)])
  const eq = c.op("Cast", [c.op("Equal", [c.unsqueeze(ii, [r]), range])], { to: BigInt(c.elemType(g)) })
  const summed = c.reduce("ReduceSum", c.op("Mul", [eq, c.unsqueeze(g, [r])]), [a], true)
  const perm = Array.from({ length: r + 1 }, (_, i) => BigInt(i))
  perm[a] = BigInt(r)
  perm[r] = BigInt(a)
  const moved = c.squeeze(c.op("Transpose", [summed], { perm }), [r])
  const pads = c.op("Concat", [c.ints(new Array(r).fill(0)), c.op("Sub", [c.shape(data), c.op("Shape", [moved])])], { axis: 0n })
  return [c.op("Pad", [moved, pads])]
}

const gatherNDRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined || !c.needs[0]) return []
  if ((Onnx.attrInt(c.node, "batch_dims") ?? 0n) !== 0n) c.fail("batch_dims is not supported")
  if (c.opset < 16) c.fail("GatherND gradients need opset 16 (ScatterND reduction)")
  return [c.op("ScatterND", [c.zerosLike(c.x(0)), c.x(1), g], { reduction: "add" })]
}

/** Scatters `g` back to the positions a selection took, via the selection of an index tensor. */
const sliceRule: GradRule = unary((c, g) => {
  const x = c.x(0)
  const sx = c.shape(x)
  const n = c.reduce("ReduceProd", sx, undefined, false) // scalar
  const ids = c.reshapeTo(c.op("Range", [c.int(0), n, c.int(1)]), sx)
  const inputs = [ids, c.x(1), c.x(2), c.x(3), c.x(4)]
  while (inputs[inputs.length - 1] === "") inputs.pop()
  const sel = c.op("Slice", inputs)
  const zeros = c.op("ConstantOfShape", [c.unsqueeze(n, [0])], { value: { ...scalarOrFloat(c, g), dims: [1] } })
  const z = scalarTensor(0, c.elemType(g)) === undefined ? c.op("Cast", [zeros], { to: BigInt(c.elemType(g)) }) : zeros
  const flat = c.op("ScatterND", [z, c.op("Reshape", [sel, c.ints([-1, 1])]), c.op("Reshape", [g, c.ints([-1])])])
  return c.reshapeTo(flat, sx)
})

const concatRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined || !c.needs.some((x) => x)) return []
  const axis = axisAttr(c, 0)
  const k = c.node.inputs.length
  if (k === 1) return [g]
  const sizes = c.op("Concat", c.node.inputs.map((x) => c.dim(x, axis)), { axis: 0n })
  return c.opN("Split", [g, sizes], k, { axis: BigInt(axis) })
}

const splitRule: GradRule = (c) => {
  if (!c.needs[0] || c.gy.every((g) => g === undefined)) return []
  const axis = axisAttr(c, 0)
  const parts = c.node.outputs.map((o, k) => c.gy[k] ?? c.zerosLike(o))
  return [parts.length === 1 ? parts[0] : c.op("Concat", parts, { axis: BigInt(axis) })]
}

const expandRule: GradRule = unary((c, g) => c.unbroadcast(g, c.x(0)))

const whereRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const cond = c.x(0)
  const zero = c.scalar(0, g)
  return [
    undefined,
    c.needs[1] ? c.unbroadcast(c.op("Where", [cond, g, zero]), c.x(1)) : undefined,
    c.needs[2] ? c.unbroadcast(c.op("Where", [cond, zero, g]), c.x(2)) : undefined
  ]
}

const castRule: GradRule = unary((c, g) => c.op("Cast", [g], { to: BigInt(c.elemType(c.x(0))) }))

type Kind = "Sum" | "Mean" | "Max" | "L2" | "SumSquare" | "LogSumExp" | "L1"

const reduceRule =
  (kind: Kind): GradRule =>
  (c) => {
    const g = c.gy[0]
    if (g === undefined || !c.needs[0]) return []
    const x = c.x(0)
    const y = c.y(0)
    const keep = (Onnx.attrInt(c.node, "keepdims") ?? 1n) === 1n
    const noop = (Onnx.attrInt(c.node, "noop_with_empty_axes") ?? 0n) === 1n
    let axes: ReadonlyArray<number> | string | undefined
    if (reduceAxesFromInput(c.node.opType, c.opset)) axes = c.has(1) ? c.constInts(c.x(1)) ?? c.x(1) : undefined
    else axes = Onnx.attrInts(c.node, "axes")?.map(Number)
    if (noop && (axes === undefined || (typeof axes !== "string" && axes.length === 0))) return [g]
    if (typeof axes === "string" && !keep && c.opset < 13) c.fail("run-time axes")
    const restore = (t: string) => (keep || axes === undefined ? t : c.unsqueeze(t, axes))
    const gk = restore(g)
    const sx = c.shape(x)
    switch (kind) {
      case "Sum":
        return [c.op("Expand", [gk, sx])]
      case "Mean": {
        const d = c.dims(x)
        const yd = c.dims(y)
        let count: string
        if (d && yd && allNum(d) && allNum(yd)) count = c.scalar(d.reduce((p, q) => p * q, 1) / Math.max(1, yd.reduce((p, q) => p * q, 1)), g)
        else {
          const nx = c.reduce("ReduceProd", sx, undefined, false)
          const ny = c.reduce("ReduceProd", c.op("Shape", [gk]), undefined, false)
          count = c.op("Cast", [c.op("Div", [nx, ny])], { to: BigInt(c.elemType(g)) })
        }
        return [c.op("Expand", [c.op("Div", [gk, count]), sx])]
      }
      case "Max": {
        const yk = restore(y)
        const mask = c.op("Cast", [c.op("Equal", [x, yk])], { to: BigInt(c.elemType(g)) })
        const cnt = c.reduce("ReduceSum", mask, axes, true)
        return [c.op("Mul", [mask, c.op("Div", [gk, cnt])])]
      }
      case "L2": {
        const yk = restore(y)
        const zero = c.scalar(0, g)
        const ratio = c.op("Div", [x, yk])
        return [c.op("Where", [c.op("Equal", [yk, zero]), zero, c.op("Mul", [gk, ratio])])]
      }
      case "L1":
        return [c.op("Mul", [gk, c.op("Sign", [x])])]
      case "SumSquare":
        return [c.op("Mul", [c.op("Mul", [gk, c.scalar(2, g)]), x])]
      case "LogSumExp":
        return [c.op("Mul", [gk, c.op("Exp", [c.op("Sub", [x, restore(y)])])])]
    }
  }

const triluRule: GradRule = unary((c, g) => c.op("Trilu", c.has(1) ? [g, c.x(1)] : [g], { upper: Onnx.attrInt(c.node, "upper") ?? 1n }))

const padRule: GradRule = unary((c, g) => {
  const mode = Onnx.attrString(c.node, "mode") ?? "constant"
  if (mode !== "constant") c.fail(`mode "${mode}" is not supported (only "constant")`)
  const neg = c.op("Neg", [c.x(1)])
  return c.op("Pad", c.has(3) ? [g, neg, "", c.x(3)] : [g, neg])
})

const tileRule: GradRule = unary((c, g) => {
  const x = c.x(0)
  const r = c.rank(x)
  // g: [r0*d0, r1*d1, ...] -> [r0, d0, r1, d1, ...] -> sum over the repeat axes
  const reps = c.x(1)
  const inter = c.op("Reshape", [
    c.op("Concat", [c.unsqueeze(reps, [1]), c.unsqueeze(c.shape(x), [1])], { axis: 1n }),
    c.ints([-1])
  ])
  const split = c.reshapeTo(g, inter)
  return c.reduce("ReduceSum", split, Array.from({ length: r }, (_, i) => 2 * i), false)
})

const scatterNDRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const red = Onnx.attrString(c.node, "reduction") ?? "none"
  if (red !== "none") c.fail(`reduction "${red}" is not supported`)
  return [
    c.needs[0] ? c.op("ScatterND", [g, c.x(1), c.zerosLike(c.x(2))]) : undefined,
    undefined,
    c.needs[2] ? c.op("GatherND", [g, c.x(1)]) : undefined
  ]
}

const scatterElementsRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const red = Onnx.attrString(c.node, "reduction") ?? "none"
  if (red !== "none") c.fail(`reduction "${red}" is not supported`)
  const axis = { axis: BigInt(axisAttr(c, 0)) }
  return [
    c.needs[0] ? c.op("ScatterElements", [g, c.x(1), c.zerosLike(c.x(2))], axis) : undefined,
    undefined,
    c.needs[2] ? c.op("GatherElements", [g, c.x(1)], axis) : undefined
  ]
}

const topKRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined || !c.needs[0]) return []
  return [c.op("ScatterElements", [c.zerosLike(c.x(0)), c.y(1), g], { axis: BigInt(axisAttr(c, -1)) })]
}

const cumSumRule: GradRule = unary((c, g) =>
  c.op("CumSum", [g, c.x(1)], {
    exclusive: Onnx.attrInt(c.node, "exclusive") ?? 0n,
    reverse: (Onnx.attrInt(c.node, "reverse") ?? 0n) === 1n ? 0n : 1n
  })
)

const clipRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const x = c.x(0)
  const zero = c.scalar(0, g)
  let inside: string | undefined
  if (c.has(1)) inside = c.op("GreaterOrEqual", [x, c.x(1)])
  if (c.has(2)) {
    const le = c.op("LessOrEqual", [x, c.x(2)])
    inside = inside === undefined ? le : c.op("And", [inside, le])
  }
  const gx = c.needs[0] ? (inside === undefined ? g : c.op("Where", [inside, g, zero])) : undefined
  const gmin = c.has(1) && c.needs[1] ? c.unbroadcast(c.op("Where", [c.op("Less", [x, c.x(1)]), g, zero]), c.x(1)) : undefined
  const gmax = c.has(2) && c.needs[2] ? c.unbroadcast(c.op("Where", [c.op("Greater", [x, c.x(2)]), g, zero]), c.x(2)) : undefined
  return [gx, gmin, gmax]
}

const sumRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  return c.node.inputs.map((x, k) => (c.needs[k] ? c.unbroadcast(g, x) : undefined))
}

const meanRule: GradRule = (c) => {
  const g = c.gy[0]
  if (g === undefined) return []
  const scaled = c.op("Div", [g, c.scalar(c.node.inputs.length, g)])
  return c.node.inputs.map((x, k) => (c.needs[k] ? c.unbroadcast(scaled, x) : undefined))
}

const ifRule: GradRule = (c) => {
  const thenG = Onnx.attrGraph(c.node, "then_branch")
  const elseG = Onnx.attrGraph(c.node, "else_branch")
  if (thenG === undefined || elseG === undefined) c.fail("missing branches")
  const targets = c.outerNeeds
  if (targets.length === 0 || c.gy.every((g) => g === undefined)) return []
  const seedsOf = (graph: Onnx.Graph): Map<string, string> => {
    const m = new Map<string, string>()
    graph.outputs.forEach((o, k) => {
      const g = c.gy[k]
      if (g !== undefined) m.set(o.name, g)
    })
    return m
  }
  const thenBody = c.branch("then_branch", thenG!, seedsOf(thenG!), targets)
  const elseBody = c.branch("else_branch", elseG!, seedsOf(elseG!), targets)
  const outs = c.opN("If", [c.x(0)], targets.length, { then_branch: thenBody, else_branch: elseBody })
  targets.forEach((t, k) => c.accumulate(t, outs[k]))
  return []
}

const E = (c: Ctx, g: string, f: (x: string) => string) => c.op("Mul", [g, f(c.x(0))])

/**
 * The ONNX operators with a gradient rule (several of them with none to give:
 * integer-valued or piecewise-constant operators).
 *
 * @since 0.1.0
 */
export const diffOps = [
  "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Cos",
  "CumSum", "Div", "Dropout", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements",
  "GatherND", "Gemm", "Greater", "GreaterOrEqual", "Identity", "If", "IsInf", "IsNaN", "LayerNormalization",
  "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Mean", "Mod", "Mul", "Neg", "NonZero", "Not",
  "Or", "Pad", "Pow", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
  "ReduceMin", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "RMSNormalization", "Round", "ScatterElements",
  "ScatterND", "Shape", "Sigmoid", "Sign", "SimplifiedLayerNormalization", "Sin", "Size", "Slice", "Softmax", "Split",
  "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor"
] as const

/**
 * An ONNX operator with a gradient rule.
 *
 * @since 0.1.0
 */
export type DiffOpName = (typeof diffOps)[number]

/**
 * Gradient rules of ONNX operators (default domain, opset 13 and later).
 *
 * @since 0.1.0
 */
export const rules = {
  Abs: unary((c, g) => E(c, g, (x) => c.op("Sign", [x]))),
  Add: addRule,
  And: none,
  ArgMax: none,
  ArgMin: none,
  Cast: castRule,
  Ceil: none,
  Clip: clipRule,
  Concat: concatRule,
  Constant: none,
  ConstantOfShape: none,
  Cos: unary((c, g) => c.op("Neg", [E(c, g, (x) => c.op("Sin", [x]))])),
  CumSum: cumSumRule,
  Div: divRule,
  Dropout: (c) => {
    // inference mode (no training_mode input, or a constant false one) is the identity
    if (c.has(2) && c.constInts(c.x(2))?.[0] !== 0) c.fail("training-mode Dropout is not supported")
    return c.gy[0] === undefined || !c.needs[0] ? [] : [c.gy[0]]
  },
  Equal: none,
  Erf: unary((c, g) => {
    const x = c.x(0)
    const e = c.op("Exp", [c.op("Neg", [c.op("Mul", [x, x])])])
    return c.op("Mul", [g, c.op("Mul", [e, c.scalar(2 / Math.sqrt(Math.PI), x)])])
  }),
  Exp: unary((c, g) => c.op("Mul", [g, c.y(0)])),
  Expand: expandRule,
  Flatten: reshapeBack,
  Floor: none,
  Gather: gatherRule,
  GatherElements: gatherElementsRule,
  GatherND: gatherNDRule,
  Gemm: gemmRule,
  Greater: none,
  GreaterOrEqual: none,
  Identity: passThrough,
  If: ifRule,
  IsInf: none,
  IsNaN: none,
  LayerNormalization: layerNormRule(true),
  LeakyRelu: unary((c, g) => {
    const alpha = Onnx.attrFloat(c.node, "alpha") ?? 0.01
    const x = c.x(0)
    return c.op("Where", [c.op("Greater", [x, c.scalar(0, x)]), g, c.op("Mul", [g, c.scalar(alpha, x)])])
  }),
  Less: none,
  LessOrEqual: none,
  Log: unary((c, g) => c.op("Div", [g, c.x(0)])),
  LogSoftmax: logSoftmaxRule,
  MatMul: matmulRule,
  Mean: meanRule,
  Mod: none,
  Mul: mulRule,
  Neg: unary((c, g) => c.op("Neg", [g])),
  NonZero: none,
  Not: none,
  Or: none,
  Pad: padRule,
  Pow: powRule,
  Range: none,
  Reciprocal: unary((c, g) => {
    const y = c.y(0)
    return c.op("Neg", [c.op("Mul", [g, c.op("Mul", [y, y])])])
  }),
  ReduceL1: reduceRule("L1"),
  ReduceL2: reduceRule("L2"),
  ReduceLogSumExp: reduceRule("LogSumExp"),
  ReduceMax: reduceRule("Max"),
  ReduceMean: reduceRule("Mean"),
  ReduceMin: reduceRule("Max"),
  ReduceSum: reduceRule("Sum"),
  ReduceSumSquare: reduceRule("SumSquare"),
  Relu: unary((c, g) => {
    const x = c.x(0)
    return c.op("Where", [c.op("Greater", [x, c.scalar(0, x)]), g, c.scalar(0, x)])
  }),
  Reshape: reshapeBack,
  RMSNormalization: layerNormRule(false),
  Round: none,
  ScatterElements: scatterElementsRule,
  ScatterND: scatterNDRule,
  Shape: none,
  Sigmoid: unary((c, g) => {
    const y = c.y(0)
    return c.op("Mul", [g, c.op("Mul", [y, c.op("Sub", [c.scalar(1, y), y])])])
  }),
  Sign: none,
  SimplifiedLayerNormalization: layerNormRule(false),
  Sin: unary((c, g) => E(c, g, (x) => c.op("Cos", [x]))),
  Size: none,
  Slice: sliceRule,
  Softmax: softmaxRule,
  Split: splitRule,
  Sqrt: unary((c, g) => c.op("Div", [c.op("Mul", [g, c.scalar(0.5, g)]), c.y(0)])),
  Squeeze: reshapeBack,
  Sub: subRule,
  Sum: sumRule,
  Tanh: unary((c, g) => {
    const y = c.y(0)
    return c.op("Mul", [g, c.op("Sub", [c.scalar(1, y), c.op("Mul", [y, y])])])
  }),
  Tile: tileRule,
  TopK: topKRule,
  Transpose: transposeRule,
  Trilu: triluRule,
  Unsqueeze: reshapeBack,
  Where: whereRule,
  Xor: none
} as const satisfies Record<DiffOpName, GradRule>

const hasRule = (op: string): op is DiffOpName => Object.prototype.hasOwnProperty.call(rules, op)

// ---------------------------------------------------------------------------
// The reverse pass
// ---------------------------------------------------------------------------

const sumAll = (s: Scope, name: string, parts: ReadonlyArray<string>): string => {
  if (parts.length === 1) return parts[0]
  if (parts.length === 2) return emit(s, `sum/${name}`, "Add", parts, 1)[0]
  return emit(s, `sum/${name}`, "Sum", parts, 1)[0]
}

/**
 * Emits the backward pass of `nodes` (in topological order) into scope `s`:
 * seeds give the gradients of some tensors, the result maps each `wrt`
 * tensor to its gradient (undefined when none flows).
 */
const differentiate = (
  s: Scope,
  nodes: ReadonlyArray<Onnx.Node>,
  seeds: ReadonlyMap<string, string>,
  wrt: ReadonlyArray<string>
): Map<string, string | undefined> => {
  const diff = (name: string) => name !== "" && isDifferentiable(s.types.get(name))
  // Forward reach from wrt.
  const reach = new Set(wrt.filter(diff))
  const outer = nodes.map((n) => Onnx.outerNames(n))
  nodes.forEach((n, i) => {
    if (n.inputs.some((x) => reach.has(x)) || outer[i].some((x) => reach.has(x))) {
      for (const o of n.outputs) if (diff(o)) reach.add(o)
    }
  })
  // Backward relevance from the seeds.
  const relevant = new Set(seeds.keys())
  for (let i = nodes.length - 1; i >= 0; i--) {
    const n = nodes[i]
    if (n.outputs.some((o) => relevant.has(o))) {
      for (const x of n.inputs) if (x !== "") relevant.add(x)
      for (const x of outer[i]) relevant.add(x)
    }
  }
  const active = nodes
    .map((n, i) => [n, i] as const)
    .filter(([n]) => n.outputs.some((o) => reach.has(o) && relevant.has(o)))
  for (const [n] of active) {
    if ((n.domain !== "" && n.domain !== "ai.onnx" && n.opType !== "SimplifiedLayerNormalization") || !hasRule(n.opType)) {
      throw new NoGradientRule({ opType: n.opType, domain: n.domain, node: n.name })
    }
  }
  const grads = new Map<string, Array<string>>()
  const push = (name: string, g: string) => {
    let list = grads.get(name)
    if (list === undefined) grads.set(name, (list = []))
    list.push(g)
    const t = s.types.get(name)
    if (t !== undefined) s.types.set(g, t)
    // The gradient has the forward tensor's dims: its symbols become shape sources.
    const d = s.env.get(name)?.dims
    d?.forEach((x, axis) => {
      if (!isNum(x) && !s.sources.has(x)) s.sources.set(x, [g, axis])
    })
  }
  for (const [name, g] of seeds) push(name, g)
  const total = (name: string): string | undefined => {
    const list = grads.get(name)
    if (list === undefined || list.length === 0) return undefined
    const sum = sumAll(s, name, list)
    const t = s.types.get(name)
    if (t !== undefined) s.types.set(sum, t)
    grads.set(name, [sum])
    return sum
  }
  for (let k = active.length - 1; k >= 0; k--) {
    const [node, i] = active[k]
    const gy = node.outputs.map((o) => (o === "" ? undefined : total(o)))
    if (gy.every((g) => g === undefined)) continue
    const needs = node.inputs.map((x) => reach.has(x) && diff(x))
    const outerNeeds = outer[i].filter((x) => reach.has(x) && diff(x))
    const ctx = makeCtx(s, node, gy, needs, outerNeeds, push)
    const rule: GradRule = rules[node.opType as DiffOpName]
    const result = rule(ctx)
    result.forEach((g, j) => {
      if (g !== undefined && needs[j]) push(node.inputs[j], g)
    })
  }
  return new Map(wrt.map((w) => [w, total(w)]))
}

/** Builds an If branch: recompute the forward branch, then its backward pass. */
const branchGraph = (
  s: Scope,
  name: string,
  graph: Onnx.Graph,
  seeds: ReadonlyMap<string, string>,
  targets: ReadonlyArray<string>
): Onnx.Graph =>
  s.b.subgraph(name, (sb) => {
    const types = new Map(s.types)
    for (const [k, v] of ElemTypes.infer(graph, s.types)) types.set(k, v)
    const env = inferGraph(graph, s.env.child(), s.opset)
    const inits = new Map(s.inits)
    for (const t of graph.initializers) inits.set(t.name, t)
    const producers = new Map(s.producers)
    for (const n of graph.nodes) for (const o of n.outputs) if (o !== "") producers.set(o, n)
    const child: Scope = {
      b: sb,
      parent: s,
      opset: s.opset,
      prefix: s.prefix,
      types,
      env,
      inits,
      producers,
      consts: new Map(),
      shapes: new Map(),
      sources: new Map()
    }
    for (const t of graph.initializers) sb.addInitializer(t)
    for (const n of graph.nodes) {
      sb.node(n.opType, n.inputs, {
        name: n.name,
        domain: n.domain,
        overload: n.overload,
        outputs: n.outputs,
        attributes: n.attributes
      })
    }
    const grads = differentiate(child, graph.nodes, seeds, targets)
    for (const t of targets) {
      const g = grads.get(t) ?? makeCtx(child, { ...graph.nodes[0] ?? emptyNode, name: `${name}/zeros` }, [], [], [], () => {}).zerosLike(t)
      const out = emit(child, `${name}/grad`, "Identity", [g], 1)[0]
      sb.output(out, types.get(t)!)
    }
  })

const emptyNode: Onnx.Node = {
  name: "",
  opType: "Identity",
  domain: "",
  overload: "",
  inputs: [],
  outputs: [],
  attributes: [],
  docString: "",
  metadataProps: [],
  deviceConfigurations: []
}

/**
 * Options of {@link backward}.
 *
 * @since 0.1.0
 */
export interface BackwardOptions {
  /** Tensors whose gradients are given (seeds): graph outputs or any activation. */
  readonly outputs: ReadonlyArray<string>
  /** Tensors to differentiate with respect to: activations, graph inputs or initializers. */
  readonly wrt: ReadonlyArray<string>
  /**
   * Shapes of tensors the model does not declare (e.g. the inputs of a
   * segment): numbers, or strings for symbolic dims (equal strings are equal
   * sizes). They let the static analysis find ranks that some rules need
   * (MatMul, Transpose without perm, Gather on an axis > 0, ...).
   */
  readonly shapes?: Readonly<Record<string, ReadonlyArray<number | string>>>
}

/**
 * A backward model and how to feed it.
 *
 * @since 0.1.0
 */
export interface Backward {
  readonly model: Onnx.Model
  /** Seed-gradient inputs, one per `outputs[i]` (`grad::<name>`). */
  readonly gradInputs: ReadonlyArray<string>
  /** Gradient outputs, one per `wrt[j]`. */
  readonly gradOutputs: ReadonlyArray<string>
  /** Forward tensors (activations and graph inputs) the backward model takes as inputs, under their forward names. */
  readonly forwardInputs: ReadonlyArray<string>
}

const allNames = (graph: Onnx.Graph, into: Set<string>): void => {
  for (const v of graph.inputs) into.add(v.name)
  for (const t of graph.initializers) into.add(t.name)
  for (const n of graph.nodes) {
    into.add(n.name)
    for (const o of n.outputs) into.add(o)
    for (const g of Onnx.subgraphs(n)) allNames(g, into)
  }
}

/**
 * Builds the backward model of `model` for the given seeds and targets.
 * Throws {@link AutodiffError}s.
 *
 * @example
 * const bw = Autodiff.backward(model, { outputs: ["y"], wrt: ["x", "layer1.weight"] })
 * bw.gradInputs   // ["grad::y"]
 * bw.gradOutputs  // ["grad::x", "grad::layer1.weight"]
 * bw.forwardInputs // ["x", ...]
 *
 * @since 0.1.0
 */
export const backward = (model: Onnx.Model, options: BackwardOptions): Backward => {
  const opset = Number(Onnx.opsetVersion(model) ?? 0n)
  if (opset < 13) throw new InvalidGradientRequest({ reason: `gradients need opset 13 or later (the model has ${opset})` })
  const graph = model.graph
  const taken = new Set<string>()
  allNames(graph, taken)
  let prefix = "grad::"
  for (let k = 1; [...taken].some((n) => n.startsWith(prefix)); k++) prefix = `grad${k}::`
  const types = ElemTypes.infer(graph)
  const env0 = new ShapeEnv(undefined, { n: 0 })
  for (const [name, dims] of Object.entries(options.shapes ?? {})) {
    env0.set(name, { dims: dims.map((d) => (typeof d === "number" ? d : `$${d}`)) })
  }
  const env = inferGraph(graph, env0, opset)
  const inits = new Map(graph.initializers.map((t) => [t.name, t] as const))
  const producers = new Map<string, Onnx.Node>()
  for (const n of graph.nodes) for (const o of n.outputs) if (o !== "") producers.set(o, n)
  const inputNames = new Set(graph.inputs.map((v) => v.name))
  const known = (t: string) => inits.has(t) || producers.has(t) || inputNames.has(t)
  for (const t of [...options.outputs, ...options.wrt]) {
    if (!known(t)) throw new InvalidGradientRequest({ reason: `unknown tensor "${t}"` })
    if (!isDifferentiable(types.get(t))) {
      throw new InvalidGradientRequest({ reason: `tensor "${t}" is not floating point (ONNX type ${types.get(t)}), so it has no gradient` })
    }
  }
  if (new Set(options.outputs).size !== options.outputs.length) throw new InvalidGradientRequest({ reason: "outputs must be distinct" })
  const b = OnnxBuilder.make({ opset, graphName: `${graph.name}.backward` })
  const s: Scope = {
    b,
    parent: undefined,
    opset,
    prefix,
    types,
    env,
    inits,
    producers,
    consts: new Map(),
    shapes: new Map(),
    sources: new Map()
  }
  const gradInputs = options.outputs.map((o) => b.input(`${prefix}${o}`, types.get(o)!))
  const seeds = new Map(options.outputs.map((o, k) => [o, gradInputs[k]] as const))
  const grads = differentiate(s, graph.nodes, seeds, options.wrt)
  const gradOutputs: Array<string> = []
  options.wrt.forEach((w) => {
    const g = grads.get(w) ?? makeCtx(s, { ...emptyNode, name: `zeros/${w}` }, [], [], [], () => {}).zerosLike(w)
    const name = b.fresh(`${prefix}${w}`)
    b.node("Identity", [g], { name: b.freshNode(`${prefix}out/${w}`), outputs: [name] })
    b.output(name, types.get(w)!)
    gradOutputs.push(name)
  })
  // Free names of the emitted graph are forward tensors.
  const built = b.build()
  const defined = new Set<string>([...built.graph.inputs.map((v) => v.name), ...built.graph.initializers.map((t) => t.name)])
  const free: Array<string> = []
  const use = (n: string) => {
    if (n !== "" && !defined.has(n)) {
      defined.add(n)
      free.push(n)
    }
  }
  for (const n of built.graph.nodes) {
    n.inputs.forEach(use)
    Onnx.outerNames(n).forEach(use)
    for (const o of n.outputs) defined.add(o)
  }
  const constants: Array<Onnx.Node> = []
  const copiedInits: Array<Onnx.TensorProto> = []
  const forwardInputs: Array<string> = []
  const declared = new Map<string, Onnx.ValueInfo>()
  for (const v of [...graph.inputs, ...graph.valueInfos, ...graph.outputs]) declared.set(v.name, v)
  for (const n of free) {
    const init = inits.get(n)
    const p = producers.get(n)
    if (init !== undefined) copiedInits.push(init)
    else if (p !== undefined && p.opType === "Constant") constants.push(p)
    else if (known(n)) forwardInputs.push(n)
    else throw new InvalidGradientRequest({ reason: `internal: backward graph reads unknown tensor "${n}"` })
  }
  const inputInfo = (n: string): Onnx.ValueInfo => {
    const d = declared.get(n)
    if (d !== undefined && Onnx.tensorType(d)?.elemType) return d
    return Onnx.tensorValueInfo(n, types.get(n) ?? 0)
  }
  const out: Onnx.Model = {
    ...model,
    graph: {
      ...built.graph,
      name: `${graph.name}.backward`,
      nodes: [...constants, ...built.graph.nodes],
      initializers: [...copiedInits, ...built.graph.initializers],
      inputs: [...built.graph.inputs, ...forwardInputs.map(inputInfo)],
      valueInfos: []
    },
    functions: model.functions
  }
  return { model: out, gradInputs, gradOutputs, forwardInputs }
}

/**
 * The forward model with extra graph outputs (e.g. a backward model's
 * `forwardInputs`), so one forward run gives what the backward run needs.
 * Names that already are graph outputs or inputs are skipped.
 *
 * @example
 * const fwd = Autodiff.withOutputs(model, bw.forwardInputs)
 *
 * @since 0.1.0
 */
export const withOutputs = (model: Onnx.Model, names: ReadonlyArray<string>): Onnx.Model => {
  const graph = model.graph
  const types = ElemTypes.infer(graph)
  const have = new Set([...graph.outputs.map((o) => o.name), ...graph.inputs.map((i) => i.name)])
  const extra = [...new Set(names)].filter((n) => !have.has(n)).map((n) => Onnx.tensorValueInfo(n, types.get(n) ?? 0))
  return { ...model, graph: { ...graph, outputs: [...graph.outputs, ...extra] } }
}

// ---------------------------------------------------------------------------
// Intervention operations: lowering to ONNX
// ---------------------------------------------------------------------------

/**
 * A value of the intervention graph while lowering: its ONNX tensor names
 * (several for multi-output ops such as TopK), dtype and concrete shape.
 *
 * @since 0.1.0
 */
export interface LoweredValue {
  readonly names: ReadonlyArray<string>
  readonly dtype: DType.DType
  readonly shape: ReadonlyArray<number>
}

/**
 * What a lowering gets: the builder, the opset, the arguments and the op's
 * JSON attributes (as `Ops` documents them).
 *
 * @since 0.1.0
 */
export interface LowerContext {
  readonly b: OnnxBuilder.Builder
  readonly opset: number
  readonly args: ReadonlyArray<LoweredValue>
  readonly attrs: Readonly<Record<string, unknown>>
}

/**
 * How an intervention operation is differentiated: it lowers to ONNX nodes
 * (returning the output names) whose gradients the ONNX {@link rules} give;
 * `differentiable: false` marks operations whose results are integer or
 * boolean (no gradient flows through them).
 *
 * @since 0.1.0
 */
export interface InterventionRule {
  readonly differentiable: boolean
  readonly lower: (c: LowerContext) => ReadonlyArray<string>
}

const i64c = (b: OnnxBuilder.Builder, values: ReadonlyArray<number>): string =>
  b.node("Constant", [], { attributes: { value: Onnx.makeTensor("", "int64", [values.length], BigInt64Array.from(values.map(BigInt))) } })

const rankOf = (c: LowerContext, k = 0) => c.args[k].shape.length
const nrm = (a: number, r: number) => (a < 0 ? a + r : a)
const direct =
  (opType: string, differentiable = true, attrs?: (c: LowerContext) => Record<string, Onnx.AttributeValue>): InterventionRule => ({
    differentiable,
    lower: (c) => [c.b.node(opType, c.args.map((a) => a.names[0]), { attributes: attrs?.(c) ?? {} })]
  })

const lowerReduce = (opType: string): InterventionRule => ({
  differentiable: true,
  lower: (c) => {
    const axes = (c.attrs.axes as ReadonlyArray<number> | undefined)?.map((a) => nrm(a, rankOf(c)))
    const keepdims = c.attrs.keepdims ? 1n : 0n
    const x = c.args[0].names[0]
    if (axes === undefined) return [c.b.node(opType, [x], { attributes: { keepdims } })]
    if (reduceAxesFromInput(opType, c.opset)) return [c.b.node(opType, [x, i64c(c.b, axes)], { attributes: { keepdims } })]
    return [c.b.node(opType, [x], { attributes: [Onnx.intAttribute("keepdims", keepdims), Onnx.intsAttribute("axes", axes)] })]
  }
})

const withAxes = (c: LowerContext, opType: string, x: string, axes: ReadonlyArray<number>): string =>
  c.opset >= 13 ? c.b.node(opType, [x, i64c(c.b, axes)]) : c.b.node(opType, [x], { attributes: [Onnx.intsAttribute("axes", axes)] })

const lowerIndex = (c: LowerContext): ReadonlyArray<string> => {
  const x = c.args[0]
  const resolved = Index.resolve(Index.parse(decodeItems(c.attrs.items)), x.shape)
  const s = Index.toOnnxSlice(resolved)
  let out = x.names[0]
  if (s.axes.length > 0) out = c.b.node("Slice", [out, i64c(c.b, s.starts), i64c(c.b, s.ends), i64c(c.b, s.axes), i64c(c.b, s.steps)])
  if (s.squeezeAxes.length > 0) out = withAxes(c, "Squeeze", out, s.squeezeAxes)
  if (s.unsqueezeAxes.length > 0) out = withAxes(c, "Unsqueeze", out, s.unsqueezeAxes)
  if (out === x.names[0]) out = c.b.node("Identity", [out])
  return [out]
}

const lowerSetIndex = (c: LowerContext): ReadonlyArray<string> => {
  const [base, value] = c.args
  const resolved = Index.resolve(Index.parse(decodeItems(c.attrs.items)), base.shape)
  const coords: Array<Array<number>> = [[]]
  let all = coords
  resolved.dims.forEach((d) => {
    const cs = d._tag === "Index" ? [d.index] : Array.from({ length: d.count }, (_, k) => d.start + k * d.step)
    const next: Array<Array<number>> = []
    for (const prefix of all) for (const x of cs) next.push([...prefix, x])
    all = next
  })
  const n = all.length
  const r = base.shape.length
  let v = value.names[0]
  if (value.dtype !== base.dtype) v = c.b.node("Cast", [v], { attributes: { to: BigInt(DType.toOnnx(base.dtype)) } })
  // ScatterND needs rank > 0; a scalar base is replaced whole
  if (r === 0) return [c.b.node("Reshape", [v, i64c(c.b, [])])]
  const idx = c.b.node("Constant", [], {
    attributes: { value: Onnx.makeTensor("", "int64", [n, r], BigInt64Array.from(all.flat().map(BigInt))) }
  })
  const expanded = c.b.node("Expand", [v, i64c(c.b, resolved.shape)])
  const flat = c.b.node("Reshape", [expanded, i64c(c.b, [n])], { attributes: c.opset >= 14 ? { allowzero: 1n } : {} })
  return [c.b.node("ScatterND", [base.names[0], idx, flat])]
}

const axisOf = (c: LowerContext, name = "axis") => BigInt(nrm(c.attrs[name] as number, rankOf(c)))

/**
 * How each intervention operation lowers to ONNX (and so is differentiated).
 *
 * @since 0.1.0
 */
export const interventionRules = {
  Add: direct("Add"),
  Sub: direct("Sub"),
  Mul: direct("Mul"),
  Div: direct("Div"),
  Pow: direct("Pow"),
  Mod: {
    // Python's %: x - floor(x / y) * y for floats (ONNX Mod cannot give the divisor's sign); Mod(fmod=0) for integers
    differentiable: true,
    lower: (c) => {
      const [x, y] = c.args.map((a) => a.names[0])
      if (!DType.isFloat(c.args[0].dtype)) return [c.b.node("Mod", [x, y], { attributes: { fmod: 0n } })]
      return [c.b.node("Sub", [x, c.b.node("Mul", [c.b.node("Floor", [c.b.node("Div", [x, y])]), y])])]
    }
  },
  Neg: direct("Neg"),
  Abs: direct("Abs"),
  Exp: direct("Exp"),
  Log: direct("Log"),
  Sqrt: direct("Sqrt"),
  Tanh: direct("Tanh"),
  Sigmoid: direct("Sigmoid"),
  Relu: direct("Relu"),
  MatMul: direct("MatMul"),
  Softmax: direct("Softmax", true, (c) => ({ axis: axisOf(c) })),
  LogSoftmax: direct("LogSoftmax", true, (c) => ({ axis: axisOf(c) })),
  ArgMax: direct("ArgMax", false, (c) => ({ axis: axisOf(c), keepdims: c.attrs.keepdims ? 1n : 0n })),
  TopK: {
    differentiable: true,
    lower: (c) =>
      c.b.node("TopK", [c.args[0].names[0], i64c(c.b, [c.attrs.k as number])], {
        outputs: 2,
        attributes: { axis: axisOf(c), largest: c.attrs.largest === false ? 0n : 1n }
      })
  },
  Select: { differentiable: true, lower: (c) => [c.args[0].names[c.attrs.index as number]] },
  ReduceSum: lowerReduce("ReduceSum"),
  ReduceMean: lowerReduce("ReduceMean"),
  ReduceMax: lowerReduce("ReduceMax"),
  ReduceL2: lowerReduce("ReduceL2"),
  Identity: direct("Identity"),
  Concat: direct("Concat", true, (c) => ({ axis: axisOf(c) })),
  Equal: direct("Equal", false),
  Less: direct("Less", false),
  LessOrEqual: direct("LessOrEqual", false),
  Greater: direct("Greater", false),
  GreaterOrEqual: direct("GreaterOrEqual", false),
  Not: direct("Not", false),
  And: direct("And", false),
  Or: direct("Or", false),
  Where: direct("Where"),
  Cast: direct("Cast", true, (c) => ({ to: BigInt(DType.toOnnx(c.attrs.to as DType.DType)) })),
  Reshape: {
    differentiable: true,
    lower: (c) => {
      const shape = c.attrs.shape as ReadonlyArray<number>
      // zeros are sizes, as in the Reshape kernel (allowzero cannot be combined with -1)
      const literal = c.opset >= 14 && shape.includes(0) && !shape.includes(-1)
      return [c.b.node("Reshape", [c.args[0].names[0], i64c(c.b, shape)], { attributes: literal ? { allowzero: 1n } : {} })]
    }
  },
  Transpose: direct("Transpose", true, (c) => {
    const r = rankOf(c)
    if (c.attrs.perm !== undefined) return { perm: (c.attrs.perm as ReadonlyArray<number>).map((a) => BigInt(nrm(a, r))) }
    const [a, b] = (c.attrs.swap as ReadonlyArray<number>).map((d) => nrm(d, r))
    const perm = Array.from({ length: r }, (_, i) => BigInt(i))
    perm[a] = BigInt(b)
    perm[b] = BigInt(a)
    return { perm }
  }),
  Unsqueeze: {
    differentiable: true,
    lower: (c) => {
      const axes = c.attrs.axes as ReadonlyArray<number>
      const r = rankOf(c) + axes.length
      return [withAxes(c, "Unsqueeze", c.args[0].names[0], axes.map((a) => nrm(a, r)))]
    }
  },
  Squeeze: {
    differentiable: true,
    lower: (c) => {
      const axes = (c.attrs.axes as ReadonlyArray<number> | undefined) ?? c.args[0].shape.flatMap((d, i) => (d === 1 ? [i] : []))
      return [withAxes(c, "Squeeze", c.args[0].names[0], axes.map((a) => nrm(a, rankOf(c))))]
    }
  },
  Index: { differentiable: true, lower: lowerIndex },
  SetIndex: { differentiable: true, lower: lowerSetIndex },
  Shape: direct("Shape", false),
  Expand: {
    differentiable: true,
    lower: (c) => [c.b.node("Expand", [c.args[0].names[0], i64c(c.b, c.attrs.shape as ReadonlyArray<number>)])]
  }
} as const satisfies Record<Ops.OpName, InterventionRule>

/**
 * One step of an intervention computation to lower: an operation on earlier
 * values (by name), giving a value named `output`.
 *
 * @since 0.1.0
 */
export interface InterventionStep {
  readonly op: Ops.OpName
  readonly args: ReadonlyArray<string>
  readonly attrs: Readonly<Record<string, unknown>>
  readonly output: string
}

/**
 * A value entering a lowered intervention computation: a graph input (an
 * activation, a user tensor), or, with `value`, a constant (scalar operands,
 * literals) stored as an initializer.
 *
 * @since 0.1.0
 */
export interface InterventionInput {
  readonly name: string
  readonly dtype: DType.DType
  readonly shape: ReadonlyArray<number>
  readonly value?: Onnx.TensorDataLike
}

/**
 * Lowers a sequence of intervention operations to an ONNX model whose inputs
 * are `inputs` (concrete dtypes and shapes, e.g. the hooked activations) and
 * whose outputs are `outputs`, so that {@link backward} differentiates it.
 * Multi-output values (TopK) are named `output`, `output:1`, ...
 *
 * @example
 * const m = Autodiff.lowerIntervention(
 *   [{ op: "Index", args: ["logits"], attrs: { items: [0, -1, 317] }, output: "loss" }],
 *   [{ name: "logits", dtype: "float32", shape: [1, 14, 512] }], ["loss"])
 * const bw = Autodiff.backward(m, { outputs: ["loss"], wrt: ["logits"] })
 *
 * @since 0.1.0
 */
export const lowerIntervention = (
  steps: ReadonlyArray<InterventionStep>,
  inputs: ReadonlyArray<InterventionInput>,
  outputs: ReadonlyArray<string>,
  opset = 17
): Onnx.Model => {
  const b = OnnxBuilder.make({ opset, graphName: "intervention" })
  const values = new Map<string, LoweredValue>()
  for (const i of inputs) {
    const name = i.value === undefined ? b.input(i.name, i.dtype, i.shape) : b.initializer(i.name, i.dtype, i.shape, i.value)
    values.set(i.name, { names: [name], dtype: i.dtype, shape: i.shape })
  }
  for (const step of steps) {
    const args = step.args.map((a) => {
      const v = values.get(a)
      if (v === undefined) throw new InvalidGradientRequest({ reason: `intervention step ${step.op} reads unknown value "${a}"` })
      return v
    })
    const names = interventionRules[step.op].lower({ b, opset, args, attrs: step.attrs })
    // Types and shapes of what was just emitted.
    const g = b.graph()
    const types = ElemTypes.infer(g)
    const env = inferGraph(g, new ShapeEnv(undefined, { n: 0 }), opset)
    const named = names.map((n, k) => {
      const out = k === 0 ? step.output : `${step.output}:${k}`
      return out === n ? n : b.node("Identity", [n], { outputs: [out] })[0]
    })
    const dims = env.get(names[0])?.dims
    const t = types.get(names[0])
    if (dims === undefined || !allNum(dims) || t === undefined) {
      throw new InvalidGradientRequest({ reason: `cannot infer the shape of intervention step ${step.op} -> ${step.output}` })
    }
    values.set(step.output, { names: named, dtype: DType.fromOnnx(t) ?? "float32", shape: dims })
  }
  const types = ElemTypes.infer(b.graph())
  for (const o of outputs) {
    const v = values.get(o)
    if (v === undefined) throw new InvalidGradientRequest({ reason: `unknown intervention output "${o}"` })
    b.output(v.names[0], types.get(v.names[0]) ?? DType.toOnnx(v.dtype), v.shape)
  }
  return b.build()
}
