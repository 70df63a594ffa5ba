/**
 * How the local interpreter computes each intervention operation. Arithmetic
 * runs on onnxruntime as one-node ONNX models (the same kernels as the model,
 * on the same execution provider), cached by operator, attributes and dtypes;
 * pure data movement (indexing, slice assignment, reshapes) runs in
 * JavaScript over the typed arrays. The table is checked against every
 * operation name.
 *
 * @example
 * import * as Kernels from "./Kernels.js"
 * const y = yield* Kernels.run(runner, "Add", [a, b], {})
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import * as ort from "onnxruntime-node"
import * as DType from "../core/DType.js"
import * as Index from "../core/Index.js"
import type * as Ops from "../core/Ops.js"
import { Tensor } from "../core/Tensor.js"
import { decodeItems } from "../core/Tracer.js"
import * as ElemTypes from "../models/ElemTypes.js"
import * as Onnx from "../models/Onnx.js"
import * as OnnxBuilder from "../models/OnnxBuilder.js"
import * as Sessions from "./Sessions.js"

/**
 * What an operation produces: one tensor, or several (TopK).
 *
 * @since 0.1.0
 */
export type Value = Tensor | ReadonlyArray<Tensor>

/**
 * A kernel failed: the message says why, in the user's terms.
 *
 * @since 0.1.0
 */
export class KernelError extends Error {
  readonly _tag = "KernelError"
}

type Attrs = Readonly<Record<string, unknown>>

/**
 * How one operation runs.
 *
 * @since 0.1.0
 */
export type Kernel = (
  sessions: Sessions.Cache,
  args: ReadonlyArray<Tensor>,
  attrs: Attrs
) => Effect.Effect<Value, KernelError | Sessions.OrtError>

const normAxis = (axis: number, rank: number): number => {
  const a = axis < 0 ? axis + rank : axis
  if (a < 0 || a >= Math.max(rank, 1)) throw new KernelError(`axis ${axis} is out of range for a tensor of rank ${rank}`)
  return a
}

const one = (t: Value): Tensor => (Array.isArray(t) ? (t as ReadonlyArray<Tensor>)[0] : (t as Tensor))

/**
 * A one-node ONNX model run on onnxruntime. `constInputs` are extra inputs
 * (ONNX takes axes, shapes and k as tensors) appended after the arguments.
 */
const onnx =
  (
    opType: string,
    options: {
      readonly attributes?: (args: ReadonlyArray<Tensor>, attrs: Attrs) => Record<string, Onnx.AttributeValue>
      readonly constInputs?: (args: ReadonlyArray<Tensor>, attrs: Attrs) => ReadonlyArray<Tensor | undefined>
      readonly outputs?: number
    } = {}
  ): Kernel =>
  (sessions, args, attrs) =>
    Effect.gen(function*() {
      const attributes = options.attributes?.(args, attrs) ?? {}
      const consts = options.constInputs?.(args, attrs) ?? []
      const inputs = [...args, ...consts]
      const key = `op:${opType}|${JSON.stringify(attributes, (_, v) => (typeof v === "bigint" ? `${v}n` : v))}|${inputs.map((t) => (t === undefined ? "-" : t.dtype)).join(",")}`
      const outputs = options.outputs ?? 1
      const session = yield* sessions.get(key, () => {
        const b = OnnxBuilder.make({ opset: 17, graphName: opType })
        const names = inputs.map((t, k) => (t === undefined ? "" : b.input(`x${k}`, t.dtype)))
        const outs = b.node(opType, names, { outputs, attributes, name: opType }) as string | ReadonlyArray<string>
        const outNames = typeof outs === "string" ? [outs] : outs
        const types = ElemTypes.infer(b.graph())
        outNames.forEach((o) => b.output(o, types.get(o) ?? DType.toOnnx(inputs[0]!.dtype)))
        return Onnx.encode(b.build())
      })
      const feeds: Record<string, ort.Tensor> = {}
      inputs.forEach((t, k) => {
        if (t !== undefined) feeds[`x${k}`] = t.toOrt()
      })
      const result = yield* Sessions.run(session, feeds, session.outputNames)
      const tensors = session.outputNames.map((n) => Tensor.fromOrt(result[n]))
      return outputs === 1 ? tensors[0] : tensors
    })

const int64 = (values: ReadonlyArray<number>): Tensor => new Tensor("int64", [values.length], BigInt64Array.from(values.map(BigInt)))

const axesOf = (args: ReadonlyArray<Tensor>, attrs: Attrs): ReadonlyArray<number> | undefined => {
  const axes = attrs.axes as ReadonlyArray<number> | undefined
  return axes?.map((a) => normAxis(a, args[0].shape.length))
}

const reduce = (opType: string, axesAsInput: boolean): Kernel => {
  const withInput = onnx(opType, {
    attributes: (_, attrs) => ({ keepdims: attrs.keepdims ? 1n : 0n }),
    constInputs: (args, attrs) => {
      const axes = axesOf(args, attrs)
      return axes === undefined ? [] : [int64(axes)]
    }
  })
  const withAttr = onnx(opType, {
    attributes: (args, attrs): Record<string, Onnx.AttributeValue> => {
      const axes = axesOf(args, attrs)
      const keepdims = attrs.keepdims ? 1n : 0n
      return axes === undefined ? { keepdims } : { keepdims, axes: axes.map(BigInt) }
    }
  })
  return axesAsInput ? withInput : withAttr
}

const js =
  (f: (args: ReadonlyArray<Tensor>, attrs: Attrs) => Value): Kernel =>
  (_, args, attrs) =>
    Effect.try({
      try: () => f(args, attrs),
      catch: (e) => (e instanceof KernelError ? e : new KernelError(e instanceof Error ? e.message : String(e)))
    })

const reshapeTo = (t: Tensor, shape: ReadonlyArray<number>): Tensor => {
  const size = t.shape.reduce((a, b) => a * b, 1)
  const known = shape.filter((d) => d !== -1).reduce((a, b) => a * b, 1)
  const holes = shape.filter((d) => d === -1).length
  if (holes > 1) throw new KernelError(`reshape to [${shape}] has more than one -1`)
  const full = shape.map((d) => (d === -1 ? size / known : d))
  if (full.reduce((a, b) => a * b, 1) !== size || full.some((d) => !Number.isInteger(d))) {
    throw new KernelError(`cannot reshape a tensor of shape [${t.shape}] (${size} elements) to [${shape}]`)
  }
  return new Tensor(t.dtype, full, t.data)
}

/**
 * Strides of a row-major shape.
 */
const stridesOf = (shape: ReadonlyArray<number>): ReadonlyArray<number> => {
  const s = new Array<number>(shape.length)
  let acc = 1
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc
    acc *= shape[i]
  }
  return s
}

/**
 * Offsets (into the flat data of `shape`) of the elements a resolved index
 * selects, in row-major order of the selection.
 */
const selectedOffsets = (resolved: Index.Resolved, shape: ReadonlyArray<number>): Int32Array | Float64Array => {
  const strides = stridesOf(shape)
  // per input dim: list of coordinates
  const coords: Array<ReadonlyArray<number>> = resolved.dims.map((d) => {
    if (d._tag === "Index") return [d.index]
    const out: Array<number> = []
    for (let k = 0; k < d.count; k++) out.push(d.start + k * d.step)
    return out
  })
  let offsets: Array<number> = [0]
  coords.forEach((cs, dim) => {
    const next: Array<number> = []
    for (const o of offsets) for (const c of cs) next.push(o + c * strides[dim])
    offsets = next
  })
  return Float64Array.from(offsets)
}

/**
 * Broadcasts `value` to `shape` (NumPy rules) and returns its elements in
 * row-major order of `shape`, as stored values of `dtype`.
 */
const broadcastTo = (value: Tensor, shape: ReadonlyArray<number>, dtype: DType.DType): DType.TypedData => {
  const v = value.dtype === dtype ? value : castTo(value, dtype)
  const rank = shape.length
  if (v.shape.length > rank) throw new KernelError(`a value of shape [${v.shape}] cannot be assigned to a selection of shape [${shape}]`)
  const vshape = [...new Array(rank - v.shape.length).fill(1), ...v.shape]
  for (let i = 0; i < rank; i++) {
    if (vshape[i] !== 1 && vshape[i] !== shape[i]) {
      throw new KernelError(`a value of shape [${v.shape}] does not broadcast to the selection's shape [${shape}]`)
    }
  }
  const vstrides = stridesOf(vshape).map((s, i) => (vshape[i] === 1 ? 0 : s))
  const size = shape.reduce((a, b) => a * b, 1)
  const out = DType.arrayFor(dtype, size) as Array<unknown> | DType.TypedData
  const idx = new Array<number>(rank).fill(0)
  const src = v.data as ArrayLike<unknown>
  for (let n = 0; n < size; n++) {
    let off = 0
    for (let i = 0; i < rank; i++) off += idx[i] * vstrides[i]
    ;(out as Array<unknown>)[n] = src[off]
    for (let i = rank - 1; i >= 0; i--) {
      if (++idx[i] < shape[i]) break
      idx[i] = 0
    }
  }
  return out as DType.TypedData
}

/**
 * Sums a (float) tensor down to a shape it was broadcast from: the gradient
 * of a broadcast value is the sum over the axes the broadcast repeated.
 *
 * @example
 * Kernels.sumTo(Tensor.from([[1, 2], [3, 4]]), [2]) // [4, 6]
 *
 * @since 0.1.0
 */
export const sumTo = (t: Tensor, shape: ReadonlyArray<number>): Tensor => {
  if (t.shape.length === shape.length && t.shape.every((d, i) => d === shape[i])) return t
  const rank = t.shape.length
  if (shape.length > rank) throw new Error(`cannot sum shape [${t.shape.join(", ")}] down to [${shape.join(", ")}]`)
  const target = [...Array(rank - shape.length).fill(1), ...shape]
  target.forEach((d, i) => {
    if (d !== 1 && d !== t.shape[i]) throw new Error(`cannot sum shape [${t.shape.join(", ")}] down to [${shape.join(", ")}]`)
  })
  const outSize = shape.reduce((a, b) => a * b, 1)
  const out = new Float64Array(outSize)
  const strides = new Array<number>(rank).fill(0)
  for (let i = rank - 1, acc = 1; i >= 0; i--) {
    strides[i] = target[i] === 1 ? 0 : acc
    acc *= target[i]
  }
  const src = t.data as ArrayLike<number>
  const idx = new Array<number>(rank).fill(0)
  for (let n = 0; n < src.length; n++) {
    let off = 0
    for (let i = 0; i < rank; i++) off += idx[i] * strides[i]
    out[off] += Number(src[n])
    for (let i = rank - 1; i >= 0; i--) {
      if (++idx[i] < t.shape[i]) break
      idx[i] = 0
    }
  }
  return new Tensor("float32", [...shape], Float32Array.from(out))
}

/**
 * Converts a tensor's elements to another dtype.
 *
 * @since 0.1.0
 */
export const castTo = (t: Tensor, dtype: DType.DType): Tensor => {
  if (t.dtype === dtype) return t
  const src = t.data as ArrayLike<number | bigint | string>
  const out = DType.arrayFor(dtype, src.length) as unknown as Array<unknown>
  const big = DType.isBig(dtype)
  const isBool = dtype === "bool"
  const intLike = !DType.isFloat(dtype) && !big && !isBool && dtype !== "string"
  for (let i = 0; i < src.length; i++) {
    const x = src[i]
    if (dtype === "string") out[i] = String(x)
    else if (big) out[i] = typeof x === "bigint" ? x : BigInt(Math.trunc(Number(x)))
    else if (isBool) out[i] = Number(x) !== 0 ? 1 : 0
    else if (intLike) out[i] = Math.trunc(Number(x))
    else out[i] = Number(x)
  }
  if (dtype === "float16") return Tensor.from(Array.from(src, Number), "float16", t.shape)
  return new Tensor(dtype, t.shape, out as unknown as DType.ArrayOf[typeof dtype])
}

/**
 * `base[items] = value` as a new tensor: `value` broadcasts to the selection
 * and is converted to `base`'s dtype.
 *
 * @example
 * Kernels.assign(x, [":", -1], Tensor.from(0)) // x with its last column zeroed
 *
 * @since 0.1.0
 */
export const assign = (base: Tensor, items: ReadonlyArray<Index.Item>, value: Tensor): Tensor => {
  const resolved = Index.resolve(Index.parse(items), base.shape)
  const offsets = selectedOffsets(resolved, base.shape)
  const values = broadcastTo(value, resolved.shape, base.dtype) as ArrayLike<unknown>
  const data = (base.data as DType.TypedData).slice() as unknown as Array<unknown>
  for (let k = 0; k < offsets.length; k++) data[offsets[k]] = values[k]
  return new Tensor(base.dtype, base.shape, data as unknown as DType.ArrayOf[typeof base.dtype])
}

const setIndex = (args: ReadonlyArray<Tensor>, attrs: Attrs): Tensor => assign(args[0], decodeItems(attrs.items), args[1])

/** The shape two shapes broadcast to (NumPy rules). */
const broadcastShape = (a: ReadonlyArray<number>, b: ReadonlyArray<number>): ReadonlyArray<number> => {
  const rank = Math.max(a.length, b.length)
  return Array.from({ length: rank }, (_, i) => {
    const x = a[a.length - rank + i] ?? 1
    const y = b[b.length - rank + i] ?? 1
    if (x !== y && x !== 1 && y !== 1) throw new KernelError(`shapes [${a}] and [${b}] do not broadcast`)
    return Math.max(x, y)
  })
}

/** Python's `%`: the result takes the divisor's sign (ONNX's Mod cannot, for floats). */
const pythonMod = (a: Tensor, b: Tensor): Tensor => {
  const shape = broadcastShape(a.shape, b.shape)
  const x = broadcastTo(a, shape, a.dtype) as ArrayLike<number | bigint>
  const y = broadcastTo(b, shape, a.dtype) as ArrayLike<number | bigint>
  const out = DType.arrayFor(a.dtype, x.length) as unknown as Array<number | bigint>
  for (let i = 0; i < x.length; i++) {
    if (typeof x[i] === "bigint") {
      const [p, q] = [x[i] as bigint, y[i] as bigint]
      out[i] = ((p % q) + q) % q
    } else {
      const [p, q] = [x[i] as number, y[i] as number]
      out[i] = p - Math.floor(p / q) * q
    }
  }
  return new Tensor(a.dtype, shape, out as unknown as DType.ArrayOf[typeof a.dtype])
}

/**
 * The transpose of a matrix (PyTorch's `t()`), copied.
 *
 * @since 0.1.0
 */
export const transpose2d = (t: Tensor): Tensor => {
  const [r, c] = t.shape
  const src = t.data as ArrayLike<unknown>
  const out = DType.arrayFor(t.dtype, r * c) as unknown as Array<unknown>
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = src[i * c + j]
  return new Tensor(t.dtype, [c, r], out as unknown as DType.ArrayOf[typeof t.dtype])
}

const transposePerm = (t: Tensor, attrs: Attrs): ReadonlyArray<number> => {
  const rank = t.shape.length
  if (attrs.perm !== undefined) return (attrs.perm as ReadonlyArray<number>).map((a) => normAxis(a, rank))
  const [a, b] = (attrs.swap as ReadonlyArray<number>).map((d) => normAxis(d, rank))
  const perm = Array.from({ length: rank }, (_, i) => i)
  perm[a] = b
  perm[b] = a
  return perm
}

/**
 * The kernel of every operation.
 *
 * @since 0.1.0
 */
export const table = {
  Add: onnx("Add"),
  Sub: onnx("Sub"),
  Mul: onnx("Mul"),
  Div: onnx("Div"),
  Pow: onnx("Pow"),
  Mod: js((args) => pythonMod(args[0], args[1])),
  Neg: onnx("Neg"),
  Abs: onnx("Abs"),
  Exp: onnx("Exp"),
  Log: onnx("Log"),
  Sqrt: onnx("Sqrt"),
  Tanh: onnx("Tanh"),
  Sigmoid: onnx("Sigmoid"),
  Relu: onnx("Relu"),
  MatMul: onnx("MatMul"),
  Softmax: onnx("Softmax", { attributes: (args, a) => ({ axis: BigInt(normAxis(a.axis as number, args[0].shape.length)) }) }),
  LogSoftmax: onnx("LogSoftmax", {
    attributes: (args, a) => ({ axis: BigInt(normAxis(a.axis as number, args[0].shape.length)) })
  }),
  ArgMax: onnx("ArgMax", {
    attributes: (args, a) => ({ axis: BigInt(normAxis(a.axis as number, args[0].shape.length)), keepdims: a.keepdims ? 1n : 0n })
  }),
  TopK: onnx("TopK", {
    outputs: 2,
    attributes: (args, a) => ({ axis: BigInt(normAxis(a.axis as number, args[0].shape.length)), largest: a.largest === false ? 0n : 1n }),
    constInputs: (_, a) => [int64([a.k as number])]
  }),
  Select: (_, args, attrs) => Effect.succeed(args[attrs.index as number]),
  ReduceSum: reduce("ReduceSum", true),
  ReduceMean: reduce("ReduceMean", false),
  ReduceMax: reduce("ReduceMax", false),
  ReduceL2: reduce("ReduceL2", false),
  Identity: js((args) => args[0]),
  Concat: onnx("Concat", { attributes: (args, a) => ({ axis: BigInt(normAxis(a.axis as number, args[0].shape.length)) }) }),
  Equal: onnx("Equal"),
  Less: onnx("Less"),
  LessOrEqual: onnx("LessOrEqual"),
  Greater: onnx("Greater"),
  GreaterOrEqual: onnx("GreaterOrEqual"),
  Not: onnx("Not"),
  And: onnx("And"),
  Or: onnx("Or"),
  Where: onnx("Where"),
  Cast: js((args, a) => castTo(args[0], a.to as DType.DType)),
  Reshape: js((args, a) => reshapeTo(args[0], a.shape as ReadonlyArray<number>)),
  Transpose: onnx("Transpose", { attributes: (args, a) => ({ perm: transposePerm(args[0], a).map(BigInt) }) }),
  Unsqueeze: js((args, a) => {
    const t = args[0]
    const rank = t.shape.length + ((a.axes as ReadonlyArray<number>).length)
    const axes = (a.axes as ReadonlyArray<number>).map((x) => normAxis(x, rank)).sort((p, q) => p - q)
    const shape = [...t.shape]
    for (const x of axes) shape.splice(x, 0, 1)
    return new Tensor(t.dtype, shape, t.data)
  }),
  Squeeze: js((args, a) => {
    const t = args[0]
    const axes = a.axes === undefined ? undefined : (a.axes as ReadonlyArray<number>).map((x) => normAxis(x, t.shape.length))
    for (const x of axes ?? []) {
      if (t.shape[x] !== 1) throw new KernelError(`cannot squeeze dimension ${x} of size ${t.shape[x]} (shape [${t.shape}])`)
    }
    const shape = t.shape.filter((d, i) => (axes === undefined ? d !== 1 : !axes.includes(i)))
    return new Tensor(t.dtype, shape, t.data)
  }),
  Index: js((args, a) => args[0].at(...decodeItems(a.items))),
  SetIndex: js(setIndex),
  Shape: js((args) => int64(args[0].shape)),
  Expand: onnx("Expand", { constInputs: (_, a) => [int64(a.shape as ReadonlyArray<number>)] })
} as const satisfies Record<Ops.OpName, Kernel>

/**
 * Runs an operation.
 *
 * @since 0.1.0
 */
export const run = (
  sessions: Sessions.Cache,
  op: Ops.OpName,
  args: ReadonlyArray<Tensor>,
  attrs: Attrs
): Effect.Effect<Value, KernelError | Sessions.OrtError> =>
  Effect.suspend(() => {
    try {
      return table[op](sessions, args, attrs)
    } catch (e) {
      return Effect.fail(e instanceof KernelError ? e : new KernelError(e instanceof Error ? e.message : String(e)))
    }
  })

/**
 * The single tensor of a value (the first, for multi-output operations).
 *
 * @since 0.1.0
 */
export const tensorOf = one

/**
 * The order of dtypes when operands of a broadcasting operation disagree,
 * as PyTorch promotes: floats above integers above bool.
 *
 * @since 0.1.0
 */
export const promote = (dtypes: ReadonlyArray<DType.DType>): DType.DType => {
  const rank: Record<string, number> = {
    bool: 0,
    uint8: 1,
    int8: 2,
    int16: 3,
    uint16: 3,
    int32: 4,
    uint32: 5,
    int64: 6,
    uint64: 6,
    float16: 7,
    float32: 8,
    float64: 9,
    string: 10
  }
  return dtypes.reduce((a, b) => (rank[b] > rank[a] ? b : a))
}
