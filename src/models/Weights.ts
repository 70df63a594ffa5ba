/**
 * Large weights stay on disk. A model loaded from a file keeps its big
 * initializers as references to their bytes in that file (ONNX external
 * data: location, offset, length) instead of holding them in memory twice
 * (once in JavaScript, once in onnxruntime); they are read back only when a
 * segment session is built or a parameter is read.
 *
 * @example
 * import * as Weights from "./Weights.js"
 * const model = Weights.externalize(Onnx.decode(bytes), bytes, "/models/m.onnx")
 * const bytesForOrt = Onnx.encode(Weights.inline(segmentModel))
 *
 * @since 0.1.0
 */
import * as fs from "node:fs"
import * as path from "node:path"
import type * as DType from "../core/DType.js"
import * as Onnx from "./Onnx.js"

/** Initializers at most this big stay in memory (shape constants, norms, biases). */
const inlineLimit = 1 << 16

const entry = (t: Onnx.TensorProto, key: string) => t.externalData.find((e) => e.key === key)?.value

/**
 * Replaces every large initializer's bytes by a reference into `file`, where
 * `bytes` (the file's content, which `model` was decoded from) holds them.
 * Small initializers are copied, so nothing keeps `bytes` alive.
 *
 * @since 0.1.0
 */
export const externalize = (model: Onnx.Model, bytes: Uint8Array, file: string): Onnx.Model => {
  const location = path.resolve(file)
  const initializers = model.graph.initializers.map((t): Onnx.TensorProto => {
    const raw = t.rawData
    if (raw === undefined || raw.buffer !== bytes.buffer) return t
    if (raw.byteLength <= inlineLimit) return { ...t, rawData: raw.slice() }
    return {
      ...t,
      rawData: undefined,
      dataLocation: "EXTERNAL",
      externalData: [
        { key: "location", value: location },
        { key: "offset", value: String(raw.byteOffset - bytes.byteOffset) },
        { key: "length", value: String(raw.byteLength) }
      ]
    }
  })
  return { ...model, graph: detach({ ...model.graph, initializers }, bytes) }
}

/** Copies every tensor still viewing `bytes` (constants in nodes), so nothing keeps the file's buffer alive. */
const detach = (graph: Onnx.Graph, bytes: Uint8Array): Onnx.Graph => {
  const copy = (t: Onnx.TensorProto): Onnx.TensorProto =>
    t.rawData !== undefined && t.rawData.buffer === bytes.buffer ? { ...t, rawData: t.rawData.slice() } : t
  const nodes = graph.nodes.map((n) => ({
    ...n,
    attributes: n.attributes.map((a) => ({
      ...a,
      ...(a.t !== undefined ? { t: copy(a.t) } : {}),
      tensors: a.tensors.map(copy),
      ...(a.g !== undefined ? { g: detach(a.g, bytes) } : {}),
      graphs: a.graphs.map((g) => detach(g, bytes))
    }))
  }))
  return { ...graph, nodes, initializers: graph.initializers.map(copy) }
}

/** Whether an initializer's bytes are a reference this module made. */
const isOurs = (t: Onnx.TensorProto) => t.dataLocation === "EXTERNAL" && t.rawData === undefined && path.isAbsolute(entry(t, "location") ?? "")

const read = (t: Onnx.TensorProto): Uint8Array => {
  const file = entry(t, "location")!
  const offset = Number(entry(t, "offset") ?? 0)
  const length = Number(entry(t, "length"))
  const out = new Uint8Array(length)
  const fd = fs.openSync(file, "r")
  try {
    let done = 0
    while (done < length) done += fs.readSync(fd, out, done, length - done, offset + done)
  } finally {
    fs.closeSync(fd)
  }
  return out
}

/**
 * An initializer with its bytes in memory (read from its file if needed).
 *
 * @since 0.1.0
 */
export const load = (t: Onnx.TensorProto): Onnx.TensorProto =>
  isOurs(t) ? { ...t, rawData: read(t), dataLocation: "DEFAULT", externalData: [] } : t

/**
 * A model whose referenced initializers are read back into it (for
 * onnxruntime, which loads such models from bytes).
 *
 * @since 0.1.0
 */
export const inline = (model: Onnx.Model): Onnx.Model =>
  model.graph.initializers.some(isOurs)
    ? { ...model, graph: { ...model.graph, initializers: model.graph.initializers.map(load) } }
    : model

/**
 * The elements of an initializer, wherever its bytes are.
 *
 * @since 0.1.0
 */
export const tensorData = (t: Onnx.TensorProto): DType.TypedData => Onnx.tensorData(load(t))
