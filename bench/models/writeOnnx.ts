/**
 * Writes an ONNX model to a file without building its encoded bytes in
 * memory: the initializers' raw data is written straight from the tensors'
 * own memory. For models of hundreds of MB, `Onnx.encode` needs a second copy
 * of every weight (and, on machines where fresh memory is slow to fault in,
 * most of its time goes there).
 *
 * The file decodes to the same model as `Onnx.encode(model)`; only the byte
 * layout differs: the streamed initializers follow the graph's other fields
 * (protobuf allows fields in any order; repeated fields keep their order).
 *
 * @example
 * await writeOnnx("bench/.cache/m/onnx/model.onnx", Gpt2.build(Gpt2.small, 0))
 */
import { open } from "node:fs/promises"
import * as Onnx from "../../src/models/Onnx.js"

const GRAPH_FIELD = 7 // ModelProto.graph
const INITIALIZER_TAG = (5 << 3) | 2 // GraphProto.initializer, length-delimited

const writeVarint = (out: Array<number>, n: number): void => {
  while (n >= 128) {
    out.push((n % 128) | 128)
    n = Math.floor(n / 128)
  }
  out.push(n)
}

/** Initializers holding only a name, dims, type and raw_data: the ones written by hand. */
const streamable = (t: Onnx.TensorProto): t is Onnx.TensorProto & { readonly rawData: Uint8Array } =>
  t.rawData !== undefined &&
  t.segment === undefined &&
  t.docString === "" &&
  t.dataLocation === "DEFAULT" &&
  t.dims.every((d) => Number.isSafeInteger(d) && d >= 0) &&
  [t.floatData, t.int32Data, t.stringData, t.int64Data, t.externalData, t.doubleData, t.uint64Data, t.metadataProps].every(
    (l) => l.length === 0
  )

/** A TensorProto up to the raw_data payload: dims (1), data_type (2), name (8), raw_data's tag and length (9). */
const tensorHeader = (t: Onnx.TensorProto & { readonly rawData: Uint8Array }): Uint8Array => {
  const out: Array<number> = []
  for (const d of t.dims) {
    out.push((1 << 3) | 0)
    writeVarint(out, d)
  }
  out.push((2 << 3) | 0)
  writeVarint(out, t.dataType)
  if (t.name !== "") {
    const name = Onnx.utf8Bytes(t.name)
    out.push((8 << 3) | 2)
    writeVarint(out, name.length)
    for (const b of name) out.push(b)
  }
  out.push((9 << 3) | 2)
  writeVarint(out, t.rawData.length)
  return Uint8Array.from(out)
}

/** Where the length-delimited top-level field `field` sits in encoded message bytes. */
const findField = (bytes: Uint8Array, field: number): { tagStart: number; start: number; end: number } => {
  let p = 0
  const varint = (): number => {
    let n = 0
    let scale = 1
    for (;;) {
      const b = bytes[p++]
      n += (b & 127) * scale
      if (b < 128) return n
      scale *= 128
    }
  }
  while (p < bytes.length) {
    const tagStart = p
    const tag = varint()
    const wire = tag % 8
    if (wire === 0) varint()
    else if (wire === 1) p += 8
    else if (wire === 5) p += 4
    else if (wire === 2) {
      const length = varint()
      if (Math.floor(tag / 8) === field) return { tagStart, start: p, end: p + length }
      p += length
    } else throw new Error(`unexpected protobuf wire type ${wire}`)
  }
  throw new Error(`field ${field} not found`)
}

/**
 * Writes `model` to `path` as ONNX protobuf, streaming the raw data of its
 * initializers from memory.
 */
export const writeOnnx = async (path: string, model: Onnx.Model): Promise<void> => {
  const graph = model.graph
  const streamed = graph.initializers.filter(streamable)
  const rest = graph.initializers.filter((t) => !streamable(t))
  const head = Onnx.encode({ ...model, graph: { ...graph, initializers: rest } })
  const at = findField(head, GRAPH_FIELD)
  const records = streamed.map((t) => {
    const header = tensorHeader(t)
    const length = header.length + t.rawData.length
    const prefix: Array<number> = [INITIALIZER_TAG]
    writeVarint(prefix, length)
    return { prefix: Uint8Array.from(prefix), header, raw: t.rawData, size: prefix.length + length }
  })
  const graphLength = at.end - at.start + records.reduce((n, r) => n + r.size, 0)
  const graphPrefix: Array<number> = [(GRAPH_FIELD << 3) | 2]
  writeVarint(graphPrefix, graphLength)

  const file = await open(path, "w")
  try {
    const write = async (bytes: Uint8Array) => {
      for (let off = 0; off < bytes.length; ) off += (await file.write(bytes, off, bytes.length - off)).bytesWritten
    }
    await write(head.subarray(0, at.tagStart))
    await write(Uint8Array.from(graphPrefix))
    await write(head.subarray(at.start, at.end))
    for (const r of records) {
      await write(r.prefix)
      await write(r.header)
      await write(r.raw)
    }
    await write(head.subarray(at.end))
  } finally {
    await file.close()
  }
}
