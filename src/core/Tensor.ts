/**
 * The user-facing tensor: a dtype, a shape and row-major typed data, with the
 * small set of reading helpers that demos and tests need, PyTorch-style
 * indexing (`at`) and PyTorch-style printing.
 *
 * Tensors are values: no method mutates one. `data` is a typed array and so
 * technically writable; treat it as read-only, because `reshape` and `toOrt`
 * share it (see each method for whether it copies).
 *
 * @example
 * import { Tensor } from "nnsight-ts"
 * const t = Tensor.from([[1, 2], [3, 4]])
 * t.shape                  // [2, 2]
 * t.at(":", -1).toArray()  // [2, 4]
 * console.log(t)           // tensor([[1., 2.],
 *                          //         [3., 4.]])
 *
 * @since 0.1.0
 */
import { Data } from "effect"
import * as ort from "onnxruntime-node"
import * as DType from "./DType.js"
import * as Index from "./Index.js"

/**
 * A value that cannot become (or be read as) a tensor: ragged nested arrays,
 * a shape that does not match the data, an unconvertible element, an
 * operation on an unsupported dtype.
 *
 * @example
 * try { Tensor.from([[1, 2], [3]]) } catch (e) { (e as InvalidTensor)._tag } // "InvalidTensor"
 *
 * @since 0.1.0
 */
export class InvalidTensor extends Data.TaggedError("InvalidTensor")<{
  readonly message: string
}> {}

/**
 * A single element as JavaScript sees it.
 *
 * @since 0.1.0
 */
export type Element = number | bigint | boolean | string

/**
 * The JavaScript type of one element of a dtype: `bigint` for 64-bit
 * integers, `boolean` for bool, `string` for string, `number` otherwise.
 *
 * @example
 * const x: ElementOf<"int64"> = 3n
 *
 * @since 0.1.0
 */
export type ElementOf<D extends DType.DType> = D extends "int64" | "uint64"
  ? bigint
  : D extends "bool"
    ? boolean
    : D extends "string"
      ? string
      : number

/**
 * Arbitrarily nested arrays of `T` (a bare `T` is a 0-d value).
 *
 * @since 0.1.0
 */
export type Nested<T> = T | ReadonlyArray<Nested<T>>

/**
 * What `Tensor.from` accepts.
 *
 * @since 0.1.0
 */
export type Input = Nested<Element> | DType.TypedData | Uint8ClampedArray | Tensor

/**
 * The dtype `Tensor.from` picks when none is given.
 *
 * @since 0.1.0
 */
export type DefaultDType<V> =
  V extends Tensor<infer D> ? D
  : V extends Float32Array ? "float32"
  : V extends Float64Array ? "float64"
  : V extends BigInt64Array ? "int64"
  : V extends BigUint64Array ? "uint64"
  : V extends Int32Array ? "int32"
  : V extends Int16Array ? "int16"
  : V extends Int8Array ? "int8"
  : V extends Uint32Array ? "uint32"
  : V extends Uint16Array ? "uint16"
  : V extends Uint8Array | Uint8ClampedArray ? "uint8"
  : V extends Nested<boolean> ? "bool"
  : V extends Nested<bigint> ? "int64"
  : V extends Nested<number> ? "float32"
  : V extends Nested<string> ? "string"
  : DType.DType

// Index-assignable view of every storage kind, so copying loops need no casts.
type Storage = { [i: number]: number | bigint | string; readonly length: number }

const product = (shape: ReadonlyArray<number>): number => shape.reduce((a, b) => a * b, 1)

const stridesOf = (shape: ReadonlyArray<number>): Array<number> => {
  const strides = new Array<number>(shape.length)
  let s = 1
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i] = s
    s *= shape[i]
  }
  return strides
}

const showShape = (shape: ReadonlyArray<number>): string => `[${shape.join(", ")}]`

const checkShape = (shape: ReadonlyArray<number>): ReadonlyArray<number> => {
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new InvalidTensor({ message: `invalid shape ${showShape(shape)}: dimensions must be non-negative integers` })
    }
  }
  return Object.freeze([...shape])
}

// ---------------------------------------------------------------------------
// float16: onnxruntime-node carries it as raw IEEE 754 half words

const halfToNumber = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1
  const e = (h >> 10) & 0x1f
  const f = h & 0x3ff
  if (e === 0) return sign * f * 2 ** -24
  if (e === 31) return f === 0 ? sign * Infinity : NaN
  return sign * (1 + f / 1024) * 2 ** (e - 15)
}

const roundHalfEven = (v: number): number => {
  const f = Math.floor(v)
  const d = v - f
  return d > 0.5 || (d === 0.5 && f % 2 !== 0) ? f + 1 : f
}

// Rounds straight from the double: going through float32 first would round twice.
const numberToHalf = (x: number): number => {
  if (Number.isNaN(x)) return 0x7e00
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0
  const a = Math.abs(x)
  // 65520 is halfway between the largest half (65504) and 2^16; ties go to even = Infinity
  if (a >= 65520) return sign | 0x7c00
  if (a < 2 ** -14) return sign | roundHalfEven(a * 2 ** 24) // a carry into 0x0400 is the smallest normal
  let e = Math.floor(Math.log2(a))
  if (2 ** e > a) e--
  if (2 ** (e + 1) <= a) e++
  let m = roundHalfEven((a / 2 ** e - 1) * 1024)
  if (m === 1024) {
    m = 0
    e++
  }
  return sign | ((e + 15) << 10) | m
}

// ---------------------------------------------------------------------------
// element conversion

const isElement = (u: unknown): u is Element =>
  typeof u === "number" || typeof u === "bigint" || typeof u === "boolean" || typeof u === "string"

const describe = (v: Element): string => (typeof v === "bigint" ? `${v}n` : typeof v === "string" ? JSON.stringify(v) : String(v))

const toInteger = (v: number | bigint | boolean, dtype: DType.DType): number | bigint => {
  if (typeof v === "boolean") return v ? 1 : 0
  if (typeof v === "bigint") return v
  if (!Number.isFinite(v)) throw new InvalidTensor({ message: `cannot convert ${v} to ${dtype}` })
  return Math.trunc(v)
}

/**
 * Converts one JavaScript value to what a dtype's storage holds. Integer
 * dtypes truncate toward zero and wrap modulo 2^bits (typed-array semantics);
 * NaN and infinities cannot become integers.
 */
const storedValue = (dtype: DType.DType, v: Element): number | bigint | string => {
  if (dtype === "string") {
    if (typeof v !== "string") throw new InvalidTensor({ message: `cannot put ${describe(v)} in a string tensor` })
    return v
  }
  if (typeof v === "string") throw new InvalidTensor({ message: `cannot convert string ${describe(v)} to ${dtype}` })
  switch (dtype) {
    case "float32":
    case "float64":
      return typeof v === "number" ? v : Number(v)
    case "float16":
      return numberToHalf(typeof v === "number" ? v : Number(v))
    case "bool":
      // NaN is truthy, as in Python
      return typeof v === "boolean" ? (v ? 1 : 0) : typeof v === "bigint" ? (v !== 0n ? 1 : 0) : v !== 0 ? 1 : 0
    case "int64":
    case "uint64": {
      const i = toInteger(v, dtype)
      const b = typeof i === "bigint" ? i : BigInt(i)
      return dtype === "int64" ? BigInt.asIntN(64, b) : BigInt.asUintN(64, b)
    }
    default: {
      const i = toInteger(v, dtype)
      // the typed array's own assignment wraps to 8/16/32 bits
      return typeof i === "bigint" ? Number(BigInt.asIntN(32, i)) : i
    }
  }
}

const readElement = (dtype: DType.DType, data: DType.TypedData, i: number): Element => {
  switch (dtype) {
    case "bool":
      return (data as Uint8Array)[i] !== 0
    case "float16":
      return halfToNumber((data as Uint16Array)[i])
    default:
      return (data as Storage)[i]
  }
}

const toNumber = (v: Element): number => (typeof v === "string" ? Number.NaN : typeof v === "boolean" ? (v ? 1 : 0) : Number(v))

// ---------------------------------------------------------------------------
// nested arrays

const flatten = (value: ReadonlyArray<unknown>): { shape: Array<number>; leaves: Array<Element> } => {
  const shape: Array<number> = []
  let probe: unknown = value
  while (Array.isArray(probe)) {
    shape.push(probe.length)
    if (probe.length === 0) break
    probe = probe[0]
  }
  const leaves: Array<Element> = []
  const path: Array<number> = []
  const at = () => (path.length === 0 ? "the top level" : `[${path.join("][")}]`)
  const walk = (v: unknown, depth: number): void => {
    if (depth === shape.length) {
      if (Array.isArray(v)) {
        throw new InvalidTensor({
          message: `ragged nested array: expected a scalar at ${at()} (dimension ${depth}), got a sequence of length ${v.length}`
        })
      }
      if (!isElement(v)) {
        throw new InvalidTensor({ message: `invalid element at ${at()}: ${String(v)} is not a number, bigint, boolean or string` })
      }
      leaves.push(v)
      return
    }
    if (!Array.isArray(v)) {
      throw new InvalidTensor({
        message: `ragged nested array: expected a sequence of length ${shape[depth]} at ${at()} (dimension ${depth}), got a scalar`
      })
    }
    if (v.length !== shape[depth]) {
      throw new InvalidTensor({
        message: `ragged nested array: expected a sequence of length ${shape[depth]} at ${at()} (dimension ${depth}), got length ${v.length}`
      })
    }
    for (let i = 0; i < v.length; i++) {
      path.push(i)
      walk(v[i], depth + 1)
      path.pop()
    }
  }
  walk(value, 0)
  return { shape, leaves }
}

const inferDType = (leaves: ReadonlyArray<Element>): DType.DType => {
  let numbers = false
  let bigints = false
  let booleans = false
  let strings = false
  for (const v of leaves) {
    if (typeof v === "number") numbers = true
    else if (typeof v === "bigint") bigints = true
    else if (typeof v === "boolean") booleans = true
    else strings = true
  }
  if (strings) {
    if (numbers || bigints || booleans) throw new InvalidTensor({ message: "cannot mix strings with other elements in one tensor" })
    return "string"
  }
  // like torch's type promotion: bool < int64 < float32
  return numbers ? "float32" : bigints ? "int64" : booleans ? "bool" : "float32"
}

const typedArrayDType = (a: ArrayBufferView): DType.DType | undefined => {
  if (a instanceof Float32Array) return "float32"
  if (a instanceof Float64Array) return "float64"
  if (a instanceof BigInt64Array) return "int64"
  if (a instanceof BigUint64Array) return "uint64"
  if (a instanceof Int32Array) return "int32"
  if (a instanceof Int16Array) return "int16"
  if (a instanceof Int8Array) return "int8"
  if (a instanceof Uint32Array) return "uint32"
  if (a instanceof Uint16Array) return "uint16"
  if (a instanceof Uint8Array || a instanceof Uint8ClampedArray) return "uint8"
  return undefined
}

// Float16Array exists from Node 24 on; onnxruntime hands it out when present.
const isFloat16Array = (a: unknown): a is { readonly buffer: ArrayBufferLike; readonly byteOffset: number; readonly length: number } =>
  ArrayBuffer.isView(a) && Object.prototype.toString.call(a) === "[object Float16Array]"

const convert = <D extends DType.DType>(
  dtype: D,
  n: number,
  get: (i: number) => Element
): DType.ArrayOf[D] => {
  const out = DType.arrayFor(dtype, n)
  const store = out as Storage
  for (let i = 0; i < n; i++) store[i] = storedValue(dtype, get(i))
  return out
}

// Not `.slice()`: on a Node Buffer (a Uint8Array) slice returns a view.
const copyStorage = <D extends DType.DType>(dtype: D, data: DType.TypedData): DType.ArrayOf[D] => {
  if (Array.isArray(data)) return [...data] as DType.ArrayOf[D]
  const out = DType.arrayFor(dtype, data.length)
  ;(out as { set: (a: ArrayLike<number | bigint>) => void }).set(data as ArrayLike<number | bigint>)
  return out
}

// ---------------------------------------------------------------------------
// Python-exact number formatting. JS's toFixed/toExponential round ties away
// from zero; Python (and so torch) rounds the exact binary value half-to-even,
// which differs on values such as 0.03125. Work on the exact decimal expansion.

const f64 = new Float64Array(1)
const u64 = new BigUint64Array(f64.buffer)

// |x| = digits * 10^-scale exactly (x finite)
const exactDecimal = (x: number): { digits: bigint; scale: number } => {
  f64[0] = Math.abs(x)
  const bits = u64[0]
  const biased = Number(bits >> 52n)
  const fraction = bits & ((1n << 52n) - 1n)
  const mantissa = biased === 0 ? fraction : fraction | (1n << 52n)
  const exp = (biased === 0 ? 1 : biased) - 1075
  return exp >= 0 ? { digits: mantissa << BigInt(exp), scale: 0 } : { digits: mantissa * 5n ** BigInt(-exp), scale: -exp }
}

const divRoundHalfEven = (n: bigint, d: bigint): bigint => {
  const q = n / d
  const r2 = (n % d) * 2n
  return r2 > d || (r2 === d && q % 2n === 1n) ? q + 1n : q
}

const nonFinite = (x: number): string | undefined =>
  Number.isNaN(x) ? "nan" : x === Infinity ? "inf" : x === -Infinity ? "-inf" : undefined

const signOf = (x: number) => (x < 0 || Object.is(x, -0) ? "-" : "")

/** Python's `"{:.<p>f}".format(x)`. */
const formatFixed = (x: number, p: number): string => {
  const special = nonFinite(x)
  if (special !== undefined) return special
  const { digits, scale } = exactDecimal(x)
  const q = scale <= p ? digits * 10n ** BigInt(p - scale) : divRoundHalfEven(digits, 10n ** BigInt(scale - p))
  const s = q.toString().padStart(p + 1, "0")
  return signOf(x) + (p === 0 ? s : `${s.slice(0, s.length - p)}.${s.slice(s.length - p)}`)
}

/** Python's `"{:.<p>e}".format(x)`. */
const formatExponential = (x: number, p: number): string => {
  const special = nonFinite(x)
  if (special !== undefined) return special
  const { digits, scale } = exactDecimal(x)
  let q: bigint
  let e: number
  if (digits === 0n) {
    q = 0n
    e = 0
  } else {
    const len = digits.toString().length
    e = len - 1 - scale
    const drop = len - 1 - p
    q = drop >= 0 ? divRoundHalfEven(digits, 10n ** BigInt(drop)) : digits * 10n ** BigInt(-drop)
    if (q === 10n ** BigInt(p + 1)) {
      q /= 10n
      e += 1
    }
  }
  const s = q.toString().padStart(p + 1, "0")
  const mant = p === 0 ? s : `${s[0]}.${s.slice(1)}`
  const exp = `${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`
  return `${signOf(x)}${mant}e${exp}`
}

// ---------------------------------------------------------------------------
// printing, after torch/_tensor_str.py (precision 4, threshold 1000, edgeitems 3, linewidth 80)

const PRECISION = 4
const THRESHOLD = 1000
const EDGE = 3
const LINEWIDTH = 80

interface Formatter {
  readonly width: number
  readonly format: (v: Element) => string
}

const makeFormatter = (dtype: DType.DType, values: ReadonlyArray<Element>): Formatter => {
  if (!DType.isFloat(dtype)) {
    const str = (v: Element) =>
      typeof v === "boolean" ? (v ? "True" : "False") : typeof v === "string" ? JSON.stringify(v) : String(v)
    const width = values.reduce((w: number, v) => Math.max(w, str(v).length), 1)
    return { width, format: (v) => str(v).padStart(width) }
  }
  const nums = values as ReadonlyArray<number>
  const finite = nums.filter((v) => Number.isFinite(v) && v !== 0)
  let intMode = true
  let sci = false
  let width = 1
  if (finite.length > 0) {
    let min = Infinity
    let max = 0
    for (const v of finite) {
      min = Math.min(min, Math.abs(v))
      max = Math.max(max, Math.abs(v))
    }
    intMode = finite.every((v) => v === Math.ceil(v))
    const wide = max / min > 1000 || max > 1e8
    sci = intMode ? wide : wide || min < 1e-4
    for (const v of finite) {
      // int mode appends "." to every finite value, hence the + 1
      const w = sci ? formatExponential(v, PRECISION).length : intMode ? formatFixed(v, 0).length + 1 : formatFixed(v, PRECISION).length
      width = Math.max(width, w)
    }
  }
  const format = (v: Element): string => {
    const x = v as number
    const s = sci
      ? formatExponential(x, PRECISION)
      : intMode
        ? formatFixed(x, 0) + (Number.isFinite(x) ? "." : "")
        : formatFixed(x, PRECISION)
    return s.padStart(width)
  }
  return { width, format }
}

const render = (t: Tensor): string => {
  const { shape, dtype } = t
  const strides = stridesOf(shape)
  const summarize = t.size > THRESHOLD
  const read = (i: number) => readElement(dtype, t.data, i)
  // positions shown along a dimension; null marks the "..." gap
  const shown = (n: number): ReadonlyArray<number | null> =>
    summarize && n > 2 * EDGE
      ? [...Array.from({ length: EDGE }, (_, i) => i), null, ...Array.from({ length: EDGE }, (_, i) => n - EDGE + i)]
      : Array.from({ length: n }, (_, i) => i)

  const values: Array<Element> = []
  const collect = (offset: number, d: number): void => {
    if (d === shape.length) {
      values.push(read(offset))
      return
    }
    for (const i of shown(shape[d])) if (i !== null) collect(offset + i * strides[d], d + 1)
  }
  collect(0, 0)
  const fmt = makeFormatter(dtype, values)

  const go = (offset: number, d: number, indent: number): string => {
    if (d === shape.length) return fmt.format(read(offset))
    const idx = shown(shape[d])
    if (d === shape.length - 1) {
      const items = idx.map((i) => (i === null ? " ..." : fmt.format(read(offset + i * strides[d]))))
      const perLine = Math.max(1, Math.floor((LINEWIDTH - indent) / (fmt.width + 2)))
      const lines: Array<string> = []
      for (let i = 0; i < items.length; i += perLine) lines.push(items.slice(i, i + perLine).join(", "))
      return `[${lines.join(",\n" + " ".repeat(indent + 1))}]`
    }
    const slices = idx.map((i) => (i === null ? "..." : go(offset + i * strides[d], d + 1, indent + 1)))
    return `[${slices.join("," + "\n".repeat(shape.length - d - 1) + " ".repeat(indent + 1))}]`
  }

  const prefix = "tensor("
  const suffixes: Array<string> = []
  let body: string
  if (t.size === 0) {
    // torch spells out the shape of empty tensors other than (0,), and the
    // dtype of every non-float32 one (nothing else shows it)
    if (shape.length !== 1) suffixes.push(`size=(${shape.join(", ")}${shape.length === 1 ? "," : ""})`)
    if (dtype !== "float32") suffixes.push(`dtype=${dtype}`)
    body = "[]"
  } else {
    if (dtype !== "float32" && dtype !== "int64" && dtype !== "bool") suffixes.push(`dtype=${dtype}`)
    body = go(0, 0, prefix.length)
  }
  let out = prefix + body
  let lastLine = out.length - out.lastIndexOf("\n") + 1
  for (const s of suffixes) {
    if (lastLine + s.length + 2 > LINEWIDTH) {
      out += `,\n${" ".repeat(prefix.length)}${s}`
      lastLine = prefix.length + s.length
    } else {
      out += `, ${s}`
      lastLine += s.length + 2
    }
  }
  return out + ")"
}

// ---------------------------------------------------------------------------

// one empty storage per dtype to check constructors against (a Tensor is made per model output)
const emptyOf = Object.fromEntries(DType.all.map((d) => [d, DType.arrayFor(d, 0)])) as { readonly [K in DType.DType]: DType.ArrayOf[K] }

/**
 * An n-dimensional array: `dtype`, `shape` and row-major `data` in the typed
 * array onnxruntime uses for that dtype (`DType.ArrayOf`).
 *
 * @example
 * const t = new Tensor("int64", [2], new BigInt64Array([1n, 2n])) // wraps, no copy
 * const u = Tensor.from([[1, 2, 3]], "int64")                     // copies, converts
 *
 * @since 0.1.0
 */
export class Tensor<D extends DType.DType = DType.DType> {
  readonly dtype: D
  readonly shape: ReadonlyArray<number>
  readonly data: DType.ArrayOf[D]

  /**
   * Wraps existing storage without copying it. Throws `InvalidTensor` when the
   * storage's length is not the shape's size or when it is not the dtype's
   * storage type. `float16` storage is raw half-precision bits (`Uint16Array`).
   *
   * @example
   * new Tensor("float32", [2, 2], new Float32Array(4))
   */
  constructor(dtype: D, shape: ReadonlyArray<number>, data: DType.ArrayOf[D]) {
    if (!DType.isDType(dtype)) throw new InvalidTensor({ message: `unknown dtype ${String(dtype)}` })
    const s = checkShape(shape)
    const expected = emptyOf[dtype]
    if (Array.isArray(expected) ? !Array.isArray(data) : data?.constructor !== expected.constructor) {
      throw new InvalidTensor({
        message: `${dtype} data must be a ${Array.isArray(expected) ? "string array" : expected.constructor.name}, got ${data?.constructor?.name ?? String(data)}`
      })
    }
    if (data.length !== product(s)) {
      throw new InvalidTensor({
        message: `shape ${showShape(s)} needs ${product(s)} elements, data has ${data.length}`
      })
    }
    this.dtype = dtype
    this.shape = s
    this.data = data
  }

  /**
   * Builds a tensor from nested arrays, a typed array, a scalar or another
   * tensor, always copying. Without `dtype`: numbers give float32, bigints
   * int64, booleans bool, strings string (mixed numbers/bigints/booleans
   * promote like torch), typed arrays their own dtype (`Uint16Array` is uint16;
   * build float16 from numbers or wrap raw bits with `new Tensor`). With
   * `dtype`, elements are converted: integers truncate toward zero and wrap
   * (`BigInt(Math.trunc(x))` for int64). `shape` reshapes the flattened
   * values (default: the nesting, 1-D for typed arrays, 0-d for scalars).
   * Throws `InvalidTensor` for ragged arrays and size mismatches.
   *
   * @example
   * Tensor.from([[1, 2], [3, 4]])                     // float32, [2, 2]
   * Tensor.from([1, 2, 3], "int64")                   // BigInt64Array [1n, 2n, 3n]
   * Tensor.from(new Float32Array(6), undefined, [2, 3])
   * Tensor.from(3.5)                                  // 0-d
   */
  static from<D extends DType.DType>(value: Input, dtype: D, shape?: ReadonlyArray<number>): Tensor<D>
  static from<const V extends Input>(value: V, dtype?: undefined, shape?: ReadonlyArray<number>): Tensor<DefaultDType<V>>
  static from(value: Input, dtype?: DType.DType, shape?: ReadonlyArray<number>): Tensor {
    if (dtype !== undefined && !DType.isDType(dtype)) throw new InvalidTensor({ message: `unknown dtype ${String(dtype)}` })
    const sized = (natural: ReadonlyArray<number>, n: number): ReadonlyArray<number> => {
      if (shape === undefined) return natural
      const s = checkShape(shape)
      if (product(s) !== n) {
        throw new InvalidTensor({ message: `shape ${showShape(s)} needs ${product(s)} elements, the value has ${n}` })
      }
      return s
    }
    if (value instanceof Tensor) {
      const d = dtype ?? value.dtype
      const data =
        d === value.dtype ? copyStorage(d, value.data) : convert(d, value.size, (i) => readElement(value.dtype, value.data, i))
      return new Tensor(d, sized(value.shape, value.size), data)
    }
    if (isFloat16Array(value)) {
      const bits = new Uint16Array(value.buffer, value.byteOffset, value.length).slice()
      const t = new Tensor("float16", [value.length], bits)
      return Tensor.from(t, dtype ?? "float16", sized([value.length], value.length))
    }
    if (ArrayBuffer.isView(value)) {
      const src = typedArrayDType(value)
      if (src === undefined) throw new InvalidTensor({ message: `unsupported typed array ${value.constructor.name}` })
      const arr = value as unknown as Storage
      const d = dtype ?? src
      const n = arr.length
      const data =
        d === src && !(value instanceof Uint8ClampedArray)
          ? copyStorage(d, value as DType.TypedData)
          : convert(d, n, (i) => arr[i] as Element)
      return new Tensor(d, sized([n], n), data)
    }
    if (Array.isArray(value)) {
      const { shape: natural, leaves } = flatten(value)
      const d = dtype ?? inferDType(leaves)
      return new Tensor(d, sized(natural, leaves.length), convert(d, leaves.length, (i) => leaves[i]))
    }
    if (isElement(value)) {
      const d = dtype ?? inferDType([value])
      return new Tensor(d, sized([], 1), convert(d, 1, () => value))
    }
    throw new InvalidTensor({ message: `cannot make a tensor from ${String(value)}` })
  }

  /**
   * A tensor of zeros (false for bool, "" for string).
   *
   * @example
   * Tensor.zeros([2, 3])          // float32
   * Tensor.zeros([4], "int64")
   */
  static zeros<D extends DType.DType = "float32">(shape: ReadonlyArray<number>, dtype?: D): Tensor<D> {
    const d = (dtype ?? "float32") as D
    return new Tensor(d, shape, DType.arrayFor(d, product(checkShape(shape))))
  }

  /**
   * A tensor filled with one value; the dtype defaults as in `Tensor.from`.
   *
   * @example
   * Tensor.full([2, 2], 0.5)            // float32
   * Tensor.full([3], 7, "int32")
   * Tensor.full([2], true)              // bool
   */
  static full<D extends DType.DType>(shape: ReadonlyArray<number>, value: Element, dtype: D): Tensor<D>
  static full<V extends Element>(shape: ReadonlyArray<number>, value: V, dtype?: undefined): Tensor<DefaultDType<V>>
  static full(shape: ReadonlyArray<number>, value: Element, dtype?: DType.DType): Tensor {
    const d = dtype ?? inferDType([value])
    const n = product(checkShape(shape))
    const v = storedValue(d, value)
    const data = DType.arrayFor(d, n)
    ;(data as { fill: (v: never) => unknown }).fill(v as never)
    return new Tensor(d, shape, data)
  }

  /**
   * `0, 1, ..., n - 1`; int64 by default, like `torch.arange(n)`.
   *
   * @example
   * Tensor.arange(6).reshape(2, 3)
   * Tensor.arange(2000, "float32")
   */
  static arange<D extends DType.DType = "int64">(n: number, dtype?: D): Tensor<D> {
    const d = (dtype ?? "int64") as D
    if (!Number.isSafeInteger(n) || n < 0) throw new InvalidTensor({ message: `arange needs a non-negative integer, got ${n}` })
    return new Tensor(d, [n], convert(d, n, (i) => i))
  }

  /**
   * Reads an onnxruntime tensor, copying its data (ORT may dispose or reuse
   * its buffers; a Tensor must outlive the run). Its data must be on the CPU
   * (`await t.getData()` first otherwise). bool stays one byte per element;
   * float16 stays raw bits.
   *
   * @example
   * const out = await session.run(feeds)
   * const logits = Tensor.fromOrt(out.logits)
   */
  static fromOrt(t: ort.Tensor): Tensor {
    if (t.location !== "cpu" && t.location !== "cpu-pinned") {
      throw new InvalidTensor({ message: `onnxruntime tensor data is on "${t.location}", not the CPU: download it with getData() first` })
    }
    if (!DType.isDType(t.type)) throw new InvalidTensor({ message: `onnxruntime dtype ${t.type} is not supported` })
    const dtype = t.type
    const raw: unknown = t.data
    let data: DType.TypedData
    if (dtype === "float16" && isFloat16Array(raw)) data = new Uint16Array(raw.buffer, raw.byteOffset, raw.length).slice()
    else if (dtype === "bool" && !(raw instanceof Uint8Array)) data = Uint8Array.from(raw as ArrayLike<number>)
    else data = copyStorage(dtype, raw as DType.TypedData)
    return new Tensor(dtype, [...t.dims], data)
  }

  /**
   * Whether a value is a Tensor.
   *
   * @example
   * Tensor.is(Tensor.from(1)) // true
   */
  static is(u: unknown): u is Tensor {
    return u instanceof Tensor
  }

  /**
   * The number of elements.
   *
   * @example
   * Tensor.zeros([2, 3]).size // 6
   */
  get size(): number {
    return this.data.length
  }

  /**
   * The number of dimensions.
   *
   * @example
   * Tensor.zeros([2, 3]).rank // 2
   */
  get rank(): number {
    return this.shape.length
  }

  /**
   * The number of dimensions (PyTorch's name).
   *
   * @example
   * Tensor.from(1).ndim // 0
   */
  get ndim(): number {
    return this.shape.length
  }

  /**
   * An onnxruntime tensor over the same storage (no copy: do not mutate
   * `data` while ORT holds it).
   *
   * @example
   * await session.run({ input_ids: Tensor.from([[1, 2]], "int64").toOrt() })
   */
  toOrt(): ort.Tensor {
    const Ctor = ort.Tensor as unknown as new (type: string, data: DType.TypedData, dims: ReadonlyArray<number>) => ort.Tensor
    return new Ctor(this.dtype, this.data, [...this.shape])
  }

  /**
   * The only element of a one-element tensor (any shape).
   *
   * @example
   * Tensor.from([[2.5]]).item() // 2.5
   */
  item(): ElementOf<D> {
    if (this.size !== 1) {
      throw new InvalidTensor({ message: `a Tensor with ${this.size} elements cannot be converted to a scalar` })
    }
    return readElement(this.dtype, this.data, 0) as ElementOf<D>
  }

  /**
   * One element by its coordinates, one per dimension; negative coordinates
   * count from the end.
   *
   * @example
   * Tensor.arange(6).reshape(2, 3).get(1, -1) // 5n
   */
  get(...indices: ReadonlyArray<number>): ElementOf<D> {
    if (indices.length !== this.rank) {
      throw new InvalidTensor({ message: `get needs ${this.rank} indices for shape ${showShape(this.shape)}, got ${indices.length}` })
    }
    const r = Index.resolve(Index.parse(indices), this.shape)
    const strides = stridesOf(this.shape)
    let offset = 0
    r.dims.forEach((d, i) => {
      if (d._tag === "Index") offset += d.index * strides[i]
    })
    return readElement(this.dtype, this.data, offset) as ElementOf<D>
  }

  /**
   * PyTorch basic indexing (`t[...]`): integers, slice strings (`":"`,
   * `"1:3"`, `"::2"`, `"-3:"`), `"..."`, `null` for a new axis (see `Index`).
   * Returns a copy. Throws `Index.InvalidIndex`, `Index.IndexOutOfRange` or
   * `Index.TooManyIndices`.
   *
   * @example
   * const h = Tensor.zeros([1, 5, 8])
   * h.at(0, -1).shape          // [8]
   * h.at("...", "::2").shape   // [1, 5, 4]
   * h.at(":", null, -1).shape  // [1, 1, 8]
   */
  at(...items: ReadonlyArray<Index.Item>): Tensor<D> {
    const r = Index.resolve(Index.parse(items), this.shape)
    const strides = stridesOf(this.shape)
    let offset = 0
    const counts: Array<number> = []
    const steps: Array<number> = []
    r.dims.forEach((d, i) => {
      if (d._tag === "Index") {
        offset += d.index * strides[i]
      } else {
        offset += d.start * strides[i]
        counts.push(d.count)
        steps.push(d.step * strides[i])
      }
    })
    const n = product(r.shape)
    const out = DType.arrayFor(this.dtype, n)
    const src = this.data as Storage
    const dst = out as Storage
    const counter = new Array<number>(counts.length).fill(0)
    for (let k = 0; k < n; k++) {
      dst[k] = src[offset]
      // odometer over the kept dimensions, innermost fastest
      for (let j = counts.length - 1; j >= 0; j--) {
        offset += steps[j]
        if (++counter[j] < counts[j]) break
        offset -= steps[j] * counts[j]
        counter[j] = 0
      }
    }
    return new Tensor(this.dtype, r.shape, out)
  }

  /**
   * Nested JavaScript arrays (a bare element for 0-d tensors): numbers,
   * bigints for int64/uint64, booleans for bool.
   *
   * @example
   * Tensor.from([[1, 2]], "int64").toArray() // [[1n, 2n]]
   */
  toArray(): Nested<ElementOf<D>> {
    const strides = stridesOf(this.shape)
    const go = (offset: number, d: number): Nested<Element> => {
      if (d === this.rank) return readElement(this.dtype, this.data, offset)
      return Array.from({ length: this.shape[d] }, (_, i) => go(offset + i * strides[d], d + 1))
    }
    return go(0, 0) as Nested<ElementOf<D>>
  }

  /**
   * All elements, row-major, as numbers (bigints via `Number`, booleans 1/0).
   *
   * @example
   * Tensor.from([[1, 2], [3, 4]], "int64").toNumbers() // [1, 2, 3, 4]
   */
  toNumbers(): Array<number> {
    if (this.dtype === "string") throw new InvalidTensor({ message: "toNumbers: a string tensor has no numbers" })
    return Array.from({ length: this.size }, (_, i) => toNumber(readElement(this.dtype, this.data, i)))
  }

  /**
   * The same elements in another shape; one dimension may be -1 (inferred).
   * Shares the storage, like a PyTorch view.
   *
   * @example
   * Tensor.arange(6).reshape(2, -1).shape   // [2, 3]
   * Tensor.arange(6).reshape([3, 2]).shape  // [3, 2]
   */
  reshape(shape: ReadonlyArray<number>): Tensor<D>
  reshape(...shape: ReadonlyArray<number>): Tensor<D>
  reshape(...args: ReadonlyArray<number | ReadonlyArray<number>>): Tensor<D> {
    const shape: Array<number> = args.length === 1 && Array.isArray(args[0]) ? [...args[0]] : (args as Array<number>)
    const holes = shape.filter((d) => d === -1).length
    if (holes > 1) throw new InvalidTensor({ message: `reshape ${showShape(shape)}: only one dimension can be -1` })
    if (holes === 1) {
      const known = product(shape.filter((d) => d !== -1))
      if (known === 0 || this.size % known !== 0) {
        throw new InvalidTensor({ message: `shape ${showShape(shape)} is invalid for a tensor of ${this.size} elements` })
      }
      shape[shape.indexOf(-1)] = this.size / known
    }
    const s = checkShape(shape)
    if (product(s) !== this.size) {
      throw new InvalidTensor({ message: `shape ${showShape(s)} is invalid for a tensor of ${this.size} elements` })
    }
    return new Tensor(this.dtype, s, this.data)
  }

  /**
   * Same dtype, same shape, equal elements (NaN equals nothing, like
   * `torch.equal`; 0 equals -0).
   *
   * @example
   * Tensor.from([1, 2]).equals(Tensor.from([1, 2])) // true
   */
  equals(other: Tensor): boolean {
    if (other.dtype !== this.dtype || other.rank !== this.rank || other.shape.some((d, i) => d !== this.shape[i])) return false
    for (let i = 0; i < this.size; i++) {
      if (readElement(this.dtype, this.data, i) !== readElement(other.dtype, other.data, i)) return false
    }
    return true
  }

  /**
   * Elementwise `|a - b| <= atol + rtol * |b|` (equal infinities are close,
   * NaN is not), like `torch.allclose` without broadcasting: the shapes must
   * match (`InvalidTensor` otherwise). Dtypes may differ.
   *
   * @example
   * Tensor.from([1, 2]).allClose(Tensor.from([1, 2.000001])) // true
   */
  allClose(other: Tensor, rtol = 1e-5, atol = 1e-8): boolean {
    if (other.rank !== this.rank || other.shape.some((d, i) => d !== this.shape[i])) {
      throw new InvalidTensor({ message: `allClose: shapes ${showShape(this.shape)} and ${showShape(other.shape)} differ` })
    }
    const a = this.toNumbers()
    const b = other.toNumbers()
    for (let i = 0; i < a.length; i++) {
      if (a[i] === b[i]) continue
      if (!(Math.abs(a[i] - b[i]) <= atol + rtol * Math.abs(b[i]))) return false
    }
    return true
  }

  /**
   * The flat (row-major) index of the largest element, first one on ties;
   * NaN counts as largest, like torch.
   *
   * @example
   * Tensor.from([[1, 9], [9, 3]]).argmax() // 1
   */
  argmax(): number {
    if (this.size === 0) throw new InvalidTensor({ message: "argmax of an empty tensor" })
    if (this.dtype === "string") throw new InvalidTensor({ message: "argmax of a string tensor" })
    let best = 0
    let bestV = readElement(this.dtype, this.data, 0)
    for (let i = 1; i < this.size; i++) {
      if (typeof bestV === "number" && Number.isNaN(bestV)) break
      const v = readElement(this.dtype, this.data, i)
      if ((typeof v === "number" && Number.isNaN(v)) || v > bestV) {
        best = i
        bestV = v
      }
    }
    return best
  }

  /**
   * Softmax along an axis (default the last), for float tensors; computed in
   * float64 and returned in the tensor's dtype.
   *
   * @example
   * Tensor.from([1, 2, 3]).softmax().toNumbers() // [0.0900, 0.2447, 0.6652] (approx.)
   */
  softmax(axis = -1): Tensor<D> {
    if (!DType.isFloat(this.dtype)) throw new InvalidTensor({ message: `softmax needs a float tensor, got ${this.dtype}` })
    if (!Number.isInteger(axis) || axis < -this.rank || axis >= this.rank || this.rank === 0) {
      throw new InvalidTensor({ message: `softmax: axis ${axis} is out of range for a tensor of dimension ${this.rank}` })
    }
    const ax = axis < 0 ? axis + this.rank : axis
    const n = this.shape[ax]
    const inner = product(this.shape.slice(ax + 1))
    const outer = product(this.shape.slice(0, ax))
    const x = this.toNumbers()
    const y = new Float64Array(x.length)
    for (let o = 0; o < outer; o++) {
      for (let j = 0; j < inner; j++) {
        const base = o * n * inner + j
        let max = -Infinity
        for (let k = 0; k < n; k++) max = Math.max(max, x[base + k * inner])
        let sum = 0
        for (let k = 0; k < n; k++) {
          // subtracting the max keeps exp from overflowing
          const e = Math.exp(x[base + k * inner] - max)
          y[base + k * inner] = e
          sum += e
        }
        for (let k = 0; k < n; k++) y[base + k * inner] /= sum
      }
    }
    return new Tensor(this.dtype, this.shape, convert(this.dtype, y.length, (i) => y[i]))
  }

  /**
   * PyTorch's printout: `tensor([[ 0.1000, -2.0000], ...])`, 4 decimals or
   * scientific notation as torch chooses, elements right-aligned, more than
   * 1000 elements summarised with `...`, and `dtype=...` for dtypes other
   * than float32, int64 and bool (named as nnsight-ts names them, so
   * `dtype=float64` where torch writes `dtype=torch.float64`).
   *
   * @example
   * String(Tensor.from([1.5, -2])) // "tensor([ 1.5000, -2.0000])"
   */
  toString(): string {
    return render(this)
  }

  /**
   * Makes `console.log(t)` print `t.toString()`.
   *
   * @example
   * console.log(Tensor.arange(3)) // tensor([0, 1, 2])
   */
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return render(this)
  }
}
