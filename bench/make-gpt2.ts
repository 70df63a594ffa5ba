/**
 * Generates the GPT-2-small-sized benchmark model into bench/.cache/ (once;
 * reruns reuse it) and reports timings and size; then loads it in
 * onnxruntime-node and runs one forward pass.
 *
 *     npx tsx bench/make-gpt2.ts            # bench/.cache/gpt2-small-seed0
 *     npx tsx bench/make-gpt2.ts --force    # regenerate
 *     npx tsx bench/make-gpt2.ts --tiny     # the tiny test config
 */
import { statSync } from "node:fs"
import { rm } from "node:fs/promises"
import * as ort from "onnxruntime-node"
import * as Gpt2 from "./models/gpt2.js"

const args = process.argv.slice(2)
const tiny = args.includes("--tiny")
const config = tiny ? Gpt2.tiny : Gpt2.small
const seed = 0
const dir = `bench/.cache/gpt2-${tiny ? "tiny" : "small"}-seed${seed}`
if (args.includes("--force")) await rm(`${dir}/stamp.json`, { force: true })

const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`
const s = (ms: number) => `${(ms / 1000).toFixed(2)} s`
const t0 = performance.now()
const { modelPath, generated, timings } = await Gpt2.writeModelDir(dir, config, seed)
const rss = process.memoryUsage()
console.log(
  `${modelPath}: ${generated ? "generated" : "cached"}, ${mib(statSync(modelPath).size)}, ` +
    `${(Gpt2.parameterCount(config) / 1e6).toFixed(1)}M parameters (+ lm_head copy of wte)`
)
if (timings)
  console.log(
    `build ${s(timings.buildMs)}, write ${s(timings.writeMs)}, total ${s(performance.now() - t0)}; ` +
      `rss ${mib(rss.rss)}, array buffers ${mib(rss.arrayBuffers)}`
  )

const t1 = performance.now()
const session = await ort.InferenceSession.create(modelPath, { extra: { session: { "intra_op.allow_spinning": "0" } } })
const t2 = performance.now()
const n = 8
const { nHead, nEmbd, nLayer, vocabSize } = config
const feeds: Record<string, ort.Tensor> = {
  input_ids: new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, k) => BigInt((k * 997) % vocabSize)), [1, n]),
  attention_mask: new ort.Tensor("int64", new BigInt64Array(n).fill(1n), [1, n]),
  position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, k) => BigInt(k)), [1, n])
}
for (let l = 0; l < nLayer; l++)
  for (const kv of ["key", "value"])
    feeds[`past_key_values.${l}.${kv}`] = new ort.Tensor("float32", new Float32Array(0), [1, nHead, 0, nEmbd / nHead])
const out = await session.run(feeds)
const t3 = performance.now()
const logits = out.logits.data as Float32Array
console.log(
  `onnxruntime: session ${s(t2 - t1)}, forward of ${n} tokens ${s(t3 - t2)}; logits [${out.logits.dims.join(", ")}], ` +
    `logits[0, 0, :3] = ${Array.from(logits.subarray(0, 3), (v) => v.toFixed(4)).join(", ")}`
)
await session.release()
