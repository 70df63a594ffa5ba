/**
 * The LoRA example (`examples/lora.ts`) end to end: training inside one
 * session halves the loss (it falls much further), and the adapter, applied
 * as an edit, makes the held-out prompt continue with " dog" where the
 * original model does not.
 */
import { afterAll, beforeAll, expect, test } from "vitest"
import { defaultModelDir, LanguageModel } from "../src/index.js"
import { run } from "../examples/lora.js"

let model: LanguageModel
beforeAll(async () => {
  model = await LanguageModel.load(defaultModelDir)
})
afterAll(() => model.close())

test("the LoRA example trains (loss below half its start) and changes the continuation as intended", async () => {
  const lines: Array<string> = []
  const report = await run(model, (line) => lines.push(line))
  expect(report.losses.length).toBeGreaterThan(1)
  expect(report.losses.at(-1)!).toBeLessThan(report.losses[0] / 2)
  expect(report.targetAfter).toBeGreaterThan(0.5)
  expect(report.targetAfter).toBeGreaterThan(report.targetBefore * 5)
  expect(report.before).not.toMatch(/big dog/)
  expect(report.after).toMatch(/big dog/)
  expect(lines.some((l) => l.startsWith("epoch 1:"))).toBe(true)
  // the original model is untouched by the session and the edit
  const again = await model.generate("Once upon a time, there was a big", { maxNewTokens: 8 })
  expect(model.tokenizer.decode(again.toNumbers())).toBe(report.before)
})
