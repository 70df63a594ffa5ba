/**
 * Attribution patching on stories260K: estimate, for every decoder layer and
 * position, how much patching the clean run's residual stream into the
 * corrupted run would move a metric, from ONE forward and ONE backward pass
 * (gradient × activation difference), then check the estimate against exact
 * activation patching on a few positions.
 *
 * Clean: "...a little girl named" → " Lily". Corrupted: "...a little boy named" → " Timmy".
 * Metric: logit(" Lily") − logit(" Timmy") at the last position.
 *
 * Run: npx tsx examples/attribution-patching.ts
 */
import { defaultModelDir, LanguageModel, type Tensor } from "../src/index.js"

const model = await LanguageModel.load(defaultModelDir)
const clean = "Once upon a time, there was a little girl named"
const corrupted = "Once upon a time, there was a little boy named"
const lily = model.tokenizer.encode(" Lily").at(-1)!
const timmy = model.tokenizer.encode(" Timmy").at(-1)!
const layers = [0, 1, 2, 3, 4]

const metricOf = (logits: Tensor) => (logits.get(0, -1, lily) as number) - (logits.get(0, -1, timmy) as number)

// one clean forward: the activations to patch in
const cleanRun = await model.trace(clean, (m) => ({
  logits: m.lm_head.output,
  acts: layers.map((l) => m.model.layers[l].output)
}))

// one corrupted forward and backward: activations and the metric's gradients
const corruptRun = await model.trace(corrupted, (m) => {
  const acts = layers.map((l) => m.model.layers[l].output)
  const grads = layers.map((l) => m.model.layers[l].output.grad)
  const logits = m.lm_head.output
  logits.at(0, -1, lily).sub(logits.at(0, -1, timmy)).backward()
  return { logits, acts, grads }
})
const base = metricOf(corruptRun.logits)
console.log(`metric on clean: ${metricOf(cleanRun.logits).toFixed(3)}, on corrupted: ${base.toFixed(3)}`)

// the estimate: (clean − corrupted) · gradient, per layer and position
const seq = corruptRun.acts[0].shape[1]
const estimate = layers.map((l) =>
  Array.from({ length: seq }, (_, p) => {
    const a = cleanRun.acts[l].at(0, p).toNumbers()
    const b = corruptRun.acts[l].at(0, p).toNumbers()
    const g = corruptRun.grads[l].at(0, p).toNumbers()
    return a.reduce((acc, x, i) => acc + (x - b[i]) * g[i], 0)
  })
)
console.log("\nattribution estimate of the metric change (rows: layers, columns: positions)")
console.log(estimate.map((row, l) => `layer ${l}: ${row.map((v) => v.toFixed(2).padStart(6)).join(" ")}`).join("\n"))

// exact patching where the estimate is largest, and at a few other places
const cells = layers
  .flatMap((l) => estimate[l].map((v, p) => ({ l, p, v })))
  .sort((a, b) => Math.abs(b.v) - Math.abs(a.v))
const chosen = [...cells.slice(0, 4), cells[Math.floor(cells.length / 2)], cells[cells.length - 1]]
console.log("\nlayer position   estimate     exact")
for (const { l, p, v } of chosen) {
  const patched = await model.trace((m, t) => {
    const src = t.invoke(clean, () => m.model.layers[l].output.at(":", p))
    return t.invoke(corrupted, () => {
      m.model.layers[l].output.setAt([":", p], src)
      return m.lm_head.output
    })
  })
  console.log(`${String(l).padStart(5)} ${String(p).padStart(8)} ${v.toFixed(3).padStart(10)} ${(metricOf(patched) - base).toFixed(3).padStart(9)}`)
}
await model.close()
