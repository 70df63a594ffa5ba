/**
 * Element types of tensors, named as onnxruntime names them, with their ONNX
 * `TensorProto.DataType` codes and the typed arrays that hold them.
 *
 * @example
 * import { DType } from "nnsight-ts"
 * DType.fromOnnx(1)          // "float32"
 * DType.toOnnx("int64")      // 7
 * DType.arrayFor("int64", 3) // BigInt64Array(3)
 *
 * @since 0.1.0
 */

/**
 * The element types nnsight-ts tensors can hold.
 *
 * @since 0.1.0
 */
export type DType =
  | "float32"
  | "float64"
  | "float16"
  | "int8"
  | "int16"
  | "int32"
  | "int64"
  | "uint8"
  | "uint16"
  | "uint32"
  | "uint64"
  | "bool"
  | "string"

/**
 * The typed array (or plain array, for strings) that stores each dtype, as
 * onnxruntime-node expects it.
 *
 * @since 0.1.0
 */
export interface ArrayOf {
  readonly float32: Float32Array
  readonly float64: Float64Array
  // onnxruntime-node carries float16 as raw 16-bit words
  readonly float16: Uint16Array
  readonly int8: Int8Array
  readonly int16: Int16Array
  readonly int32: Int32Array
  readonly int64: BigInt64Array
  readonly uint8: Uint8Array
  readonly uint16: Uint16Array
  readonly uint32: Uint32Array
  readonly uint64: BigUint64Array
  // onnxruntime-node carries bool as one byte per element
  readonly bool: Uint8Array
  readonly string: Array<string>
}

/**
 * Any storage of a tensor's elements.
 *
 * @since 0.1.0
 */
export type TypedData = ArrayOf[DType]

/**
 * ONNX `TensorProto.DataType` codes.
 *
 * @since 0.1.0
 */
export const OnnxCode = {
  UNDEFINED: 0,
  FLOAT: 1,
  UINT8: 2,
  INT8: 3,
  UINT16: 4,
  INT16: 5,
  INT32: 6,
  INT64: 7,
  STRING: 8,
  BOOL: 9,
  FLOAT16: 10,
  DOUBLE: 11,
  UINT32: 12,
  UINT64: 13,
  COMPLEX64: 14,
  COMPLEX128: 15,
  BFLOAT16: 16
} as const

const toOnnxTable = {
  float32: OnnxCode.FLOAT,
  float64: OnnxCode.DOUBLE,
  float16: OnnxCode.FLOAT16,
  int8: OnnxCode.INT8,
  int16: OnnxCode.INT16,
  int32: OnnxCode.INT32,
  int64: OnnxCode.INT64,
  uint8: OnnxCode.UINT8,
  uint16: OnnxCode.UINT16,
  uint32: OnnxCode.UINT32,
  uint64: OnnxCode.UINT64,
  bool: OnnxCode.BOOL,
  string: OnnxCode.STRING
} as const satisfies Record<DType, number>

const fromOnnxTable: ReadonlyMap<number, DType> = new Map(
  Object.entries(toOnnxTable).map(([k, v]) => [v, k as DType])
)

/**
 * All dtypes, in a stable order.
 *
 * @since 0.1.0
 */
export const all: ReadonlyArray<DType> = Object.keys(toOnnxTable) as Array<DType>

/**
 * The ONNX `TensorProto.DataType` code of a dtype.
 *
 * @example
 * DType.toOnnx("float32") // 1
 *
 * @since 0.1.0
 */
export const toOnnx = (dtype: DType): number => toOnnxTable[dtype]

/**
 * The dtype of an ONNX `TensorProto.DataType` code, or `undefined` for codes
 * nnsight-ts does not carry (complex, bfloat16, float8).
 *
 * @example
 * DType.fromOnnx(7) // "int64"
 *
 * @since 0.1.0
 */
export const fromOnnx = (code: number): DType | undefined => fromOnnxTable.get(code)

/**
 * Whether a string names a dtype.
 *
 * @since 0.1.0
 */
export const isDType = (u: unknown): u is DType => typeof u === "string" && u in toOnnxTable

const ctors = {
  float32: (n: number) => new Float32Array(n),
  float64: (n: number) => new Float64Array(n),
  float16: (n: number) => new Uint16Array(n),
  int8: (n: number) => new Int8Array(n),
  int16: (n: number) => new Int16Array(n),
  int32: (n: number) => new Int32Array(n),
  int64: (n: number) => new BigInt64Array(n),
  uint8: (n: number) => new Uint8Array(n),
  uint16: (n: number) => new Uint16Array(n),
  uint32: (n: number) => new Uint32Array(n),
  uint64: (n: number) => new BigUint64Array(n),
  bool: (n: number) => new Uint8Array(n),
  string: (n: number) => new Array<string>(n).fill("")
} as const satisfies { readonly [K in DType]: (n: number) => ArrayOf[K] }

/**
 * A zero-filled storage of `n` elements of a dtype.
 *
 * @example
 * DType.arrayFor("int64", 3) // BigInt64Array [0n, 0n, 0n]
 *
 * @since 0.1.0
 */
export const arrayFor = <D extends DType>(dtype: D, n: number): ArrayOf[D] => ctors[dtype](n) as ArrayOf[D]

/**
 * Bytes per element (strings: 0, they have no fixed width).
 *
 * @since 0.1.0
 */
export const byteSize = (dtype: DType): number => {
  switch (dtype) {
    case "float64":
    case "int64":
    case "uint64":
      return 8
    case "float32":
    case "int32":
    case "uint32":
      return 4
    case "float16":
    case "int16":
    case "uint16":
      return 2
    case "int8":
    case "uint8":
    case "bool":
      return 1
    case "string":
      return 0
  }
}

/**
 * Whether elements are stored as `bigint`.
 *
 * @since 0.1.0
 */
export const isBig = (dtype: DType): dtype is "int64" | "uint64" => dtype === "int64" || dtype === "uint64"

/**
 * Whether a dtype is a floating-point type.
 *
 * @since 0.1.0
 */
export const isFloat = (dtype: DType): dtype is "float32" | "float64" | "float16" =>
  dtype === "float32" || dtype === "float64" || dtype === "float16"
