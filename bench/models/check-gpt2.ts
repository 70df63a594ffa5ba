/**
 * Dev-only: compares the graph `gpt2.ts` generates with PyTorch's export of
 * the same architecture (`gpt2_reference.py`): inputs, outputs, initializer
 * names/shapes/order, and every node (name, op, inputs, outputs, attributes,
 * constant values). Then runs both in onnxruntime with the reference's weights
 * and compares all outputs.
 *
 *     /usr/bin/python3 bench/models/gpt2_reference.py /tmp/ref.onnx 64,16,32,2,4
 *     npx tsx bench/models/check-gpt2.ts /tmp/ref.onnx 64,16,32,2,4
 */
import { readFileSync } from "node:fs"
import { isDeepStrictEqual } from "node:util"
import * as ort from "onnxruntime-node"
import * as Onnx from "../../src/models/Onnx.js"
import * as Gpt2 from "./gpt2.js"

const [refPath, dimsArg = "64,16,32,2,4"] = process.argv.slice(2)
if (refPath === undefined) throw new Error("usage: check-gpt2.ts REF.onnx vocab,positions,embd,layers,heads[,inner]")
const [vocabSize, nPositions, nEmbd, nLayer, nHead, nInner] = dimsArg.split(",").map(Number)
const config: Gpt2.Gpt2Config = { vocabSize, nPositions, nEmbd, nLayer, nHead, ...(nInner ? { nInner } : {}) }

const ref = Onnx.decode(readFileSync(refPath))
const ours = Gpt2.build(config, 0)
const problems: Array<string> = []
const same = (what: string, a: unknown, b: unknown) => {
  if (!isDeepStrictEqual(a, b)) problems.push(`${what}:\n  ours ${show(a)}\n  ref  ${show(b)}`)
}
const show = (v: unknown) => JSON.stringify(v, (_, x) => (typeof x === "bigint" ? `${x}n` : x instanceof Uint8Array ? `bytes(${x.length})` : x))

const tensorKey = (t: Onnx.TensorProto) => ({ dataType: t.dataType, dims: t.dims, data: Array.from(Onnx.tensorData(t) as ArrayLike<unknown>, String) })
const attrKey = (a: Onnx.Attribute) => ({
  name: a.name,
  type: a.type,
  f: a.f,
  i: a.i,
  s: a.s && Onnx.utf8(a.s),
  t: a.t && tensorKey(a.t),
  floats: a.floats,
  ints: a.ints
})
const vi = (v: Onnx.ValueInfo) => ({ name: v.name, type: Onnx.tensorType(v) })

same("opsets", ours.opsetImports, ref.opsetImports)
same("irVersion", ours.irVersion, ref.irVersion)
same("inputs", ours.graph.inputs.map(vi), ref.graph.inputs.map(vi))
same("outputs", ours.graph.outputs.map(vi), ref.graph.outputs.map(vi))
same(
  "initializers",
  ours.graph.initializers.map((t) => [t.name, t.dataType, t.dims]),
  ref.graph.initializers.map((t) => [t.name, t.dataType, t.dims])
)
same("node count", ours.graph.nodes.length, ref.graph.nodes.length)
const n = Math.min(ours.graph.nodes.length, ref.graph.nodes.length)
for (let k = 0; k < n && problems.length < 20; k++) {
  const a = ours.graph.nodes[k]
  const b = ref.graph.nodes[k]
  same(
    `node ${k}`,
    { name: a.name, op: a.opType, domain: a.domain, inputs: a.inputs, outputs: a.outputs, attributes: a.attributes.map(attrKey) },
    { name: b.name, op: b.opType, domain: b.domain, inputs: b.inputs, outputs: b.outputs, attributes: b.attributes.map(attrKey) }
  )
}

// Same graph with the reference's weights: outputs must match the reference's bit for bit
// (up to kernel nondeterminism, which there should be none of on one thread).
const byName = new Map(ref.graph.initializers.map((t) => [t.name, t]))
const withRefWeights: Onnx.Model = {
  ...ours,
  graph: { ...ours.graph, initializers: ours.graph.initializers.map((t) => byName.get(t.name) ?? t) }
}
const options: ort.InferenceSession.SessionOptions = { intraOpNumThreads: 1, extra: { session: { "intra_op.allow_spinning": "0" } } }
const [s1, s2] = await Promise.all([
  ort.InferenceSession.create(Onnx.encode(withRefWeights), options),
  ort.InferenceSession.create(Onnx.encode(ref), options)
])
const B = 2
const S = 3
const past = 2
const hd = nEmbd / nHead
const feeds: Record<string, ort.Tensor> = {
  input_ids: new ort.Tensor("int64", BigInt64Array.from({ length: B * S }, (_, k) => BigInt((k * 7 + 3) % vocabSize)), [B, S]),
  attention_mask: new ort.Tensor("int64", BigInt64Array.from({ length: B * (past + S) }, (_, k) => (k === 0 ? 0n : 1n)), [B, past + S]),
  position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: B * S }, (_, k) => BigInt(past + (k % S))), [B, S])
}
for (let l = 0; l < nLayer; l++)
  for (const kv of ["key", "value"])
    feeds[`past_key_values.${l}.${kv}`] = new ort.Tensor(
      "float32",
      Float32Array.from({ length: B * nHead * past * hd }, (_, k) => Math.sin(k * 0.37 + l)),
      [B, nHead, past, hd]
    )
const [o1, o2] = [await s1.run(feeds), await s2.run(feeds)]
let maxDiff = 0
for (const name of s2.outputNames) {
  const a = o1[name].data as Float32Array
  const b = o2[name].data as Float32Array
  same(`dims of ${name}`, o1[name].dims, o2[name].dims)
  for (let k = 0; k < b.length; k++) maxDiff = Math.max(maxDiff, Math.abs(a[k] - b[k]))
}
await Promise.all([s1.release(), s2.release()])

console.log(`${ours.graph.nodes.length} nodes, ${ours.graph.initializers.length} initializers; max |ours - ref| over all outputs: ${maxDiff}`)
if (problems.length > 0 || maxDiff !== 0) {
  console.log(problems.join("\n"))
  process.exit(1)
}
console.log("identical to the PyTorch export")
