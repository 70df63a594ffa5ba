/**
 * Tensor literals in the intervention graph: a `Tensor` as JSON-safe data
 * (dtype, shape, base64 of its little-endian bytes; strings as a JSON array).
 *
 * @example
 * import * as Literal from "./Literal.js"
 * const lit = Literal.fromTensor(Tensor.from([1, 2]))
 * Literal.toTensor(lit).equals(Tensor.from([1, 2])) // true
 *
 * @since 0.1.0
 */
import * as DType from "./DType.js"
import type * as Graph from "./Graph.js"
import { Tensor } from "./Tensor.js"

/**
 * Encodes a tensor.
 *
 * @since 0.1.0
 */
export const fromTensor = (t: Tensor): Graph.Literal => {
  if (t.dtype === "string") return { dtype: t.dtype, shape: [...t.shape], data: JSON.stringify(t.data) }
  const data = t.data as Exclude<DType.TypedData, Array<string>>
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength)
  return { dtype: t.dtype, shape: [...t.shape], data: bytes.toString("base64") }
}

/**
 * Decodes a tensor (the bytes are copied into a fresh, aligned array).
 *
 * @since 0.1.0
 */
export const toTensor = (lit: Graph.Literal): Tensor => {
  if (!DType.isDType(lit.dtype)) throw new Error(`unknown dtype "${lit.dtype}" in a tensor literal`)
  const dtype = lit.dtype
  const size = lit.shape.reduce((a, b) => a * b, 1)
  if (dtype === "string") return Tensor.from(JSON.parse(lit.data) as Array<string>, "string", lit.shape)
  const bytes = Buffer.from(lit.data, "base64")
  const out = DType.arrayFor(dtype, size) as Exclude<DType.TypedData, Array<string>>
  if (bytes.byteLength !== out.byteLength) {
    throw new Error(`tensor literal of shape [${lit.shape}] and dtype ${dtype} has ${bytes.byteLength} bytes, expected ${out.byteLength}`)
  }
  new Uint8Array(out.buffer).set(bytes)
  return Tensor.from(out, dtype, lit.shape)
}
