/**
 * A layer sweep in a fresh process: patch each decoder layer's output in turn
 * (two invokes: a clean prompt's last position into a corrupted prompt) and
 * report the peak resident memory against the bytes of the model's weights.
 *
 *     npx tsx bench/sweep.ts <model-dir> <layers-path> <n-layers> <seq>
 */
import * as fs from "node:fs"
import { LanguageModel } from "../src/index.js"
import * as DType from "../src/core/DType.js"

const [dir, layersPath, nLayersArg, seqArg] = process.argv.slice(2)
const model = await LanguageModel.load(dir)
// weight bytes: every initializer's elements times their size
const weights = model.runtime.loaded.model.graph.initializers.reduce(
  (a, t) => a + t.dims.reduce((n, d) => n * Number(d), 1) * DType.byteSize(DType.fromOnnx(t.dataType) ?? "float32"),
  0
)
const seq = Number(seqArg)
const clean = Array.from({ length: seq }, (_, i) => (i * 7 + 3) % 500)
const corrupted = clean.map((t, i) => (i === 2 ? (t + 11) % 500 : t))
const layers = (m: any) => layersPath.split(".").reduce((e: any, p: string) => e[p], m)
let sampled = 0
const sampler = setInterval(() => (sampled = Math.max(sampled, process.memoryUsage().rss)), 20)
const t0 = performance.now()
for (let k = 0; k < Number(nLayersArg); k++) {
  await model.trace((m, t) => {
    const src = t.invoke(clean, () => layers(m)[k].output.at(":", -1))
    return t.invoke(corrupted, () => {
      layers(m)[k].output.setAt([":", -1], src)
      return { logits: m.output.at(":", -1) }
    })
  })
}
const elapsed = performance.now() - t0
clearInterval(sampler)
// the peak resident memory of this process: Linux's VmHWM (ru_maxrss can carry
// over the parent's peak across exec); elsewhere the highest rss sampled
const hwm = (() => {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync("/proc/self/status", "utf8"))
    return m ? Number(m[1]) * 1024 : undefined
  } catch {
    return undefined
  }
})()
const rss = hwm ?? Math.max(sampled, process.memoryUsage().rss)
console.log(JSON.stringify({ weights_bytes: weights, max_rss_bytes: rss, sessions: model.runtime.sessions.created(), elapsed_ms: elapsed }))
await model.close()
