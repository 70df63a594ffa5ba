/**
 * Model editing (nnsight's `tests/test_lm.py` editing cases: test_editing,
 * test_non_inplace_editing, test_clear_edits, test_batched_editing) on
 * stories260K: `model.edit(fn)` gives a model whose every trace, generation
 * and session trace first applies `fn`, to every row; `{ inplace: true }`
 * edits the model itself; `clearEdits()` undoes that.
 */
import { afterAll, beforeAll, describe, expect, test } from "vitest"
import { LanguageModel, Tensor } from "../src/index.js"

const expectClose = (actual: Tensor, expected: Tensor, tol = 1e-5): void => {
  expect(actual.shape).toEqual(expected.shape)
  const a = actual.toNumbers()
  const b = expected.toNumbers()
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i] - b[i]) <= tol * Math.max(1, Math.abs(b[i])))) expect.fail(`element ${i}: got ${a[i]}, want ${b[i]}`)
  }
}
const allZero = (t: Tensor): boolean => t.toNumbers().every((v) => v === 0)
const noneZero = (t: Tensor): boolean => t.toNumbers().every((v) => v !== 0)

const prompt = "Once upon a time, there was a little girl named"
const promptB = "Once upon a time, there was a little boy named"

let model: LanguageModel
beforeAll(async () => {
  model = await LanguageModel.load("models/stories260K")
})
afterAll(() => model.close())

describe("model.edit", () => {
  test("test_editing: an edited model's trace equals a trace that sets the value itself", async () => {
    const edited = await model.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    const viaEdit = await edited.trace(prompt, (m) => ({ mlp: m.model.layers[0].mlp.output, logits: m.lm_head.output }))
    const explicit = await model.trace(prompt, (m) => {
      m.model.layers[0].mlp.output.set(0)
      return { mlp: m.model.layers[0].mlp.output, logits: m.lm_head.output }
    })
    expect(allZero(viaEdit.mlp)).toBe(true)
    expectClose(viaEdit.logits, explicit.logits)
  })

  test("test_non_inplace_editing: edit() leaves the original alone; inplace edits carry into later copies", async () => {
    const plain = await model.trace(prompt, (m) => m.lm_head.output)
    const ablated = model.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    expect(ablated).not.toBe(model)
    expectClose(await model.trace(prompt, (m) => m.lm_head.output), plain, 0)
    expect((await ablated.trace(prompt, (m) => m.lm_head.output)).allClose(plain, 1e-3, 1e-3)).toBe(false)

    try {
      const same = model.edit((m) => m.model.layers[1].output.setAt([":", 0], 0), { inplace: true })
      expect(same).toBe(model)
      const copy = model.edit((m) => m.model.layers[1].output.setAt([":", 1], 0))
      const l1 = await model.trace(prompt, (m) => m.model.layers[1].output)
      const l1Edited = await copy.trace(prompt, (m) => m.model.layers[1].output)
      expect(allZero(l1.at(":", 0))).toBe(true)
      expect(noneZero(l1.at(":", 1))).toBe(true)
      expect(allZero(l1Edited.at(":", 0))).toBe(true)
      expect(allZero(l1Edited.at(":", 1))).toBe(true)
    } finally {
      model.clearEdits()
    }
  })

  test("test_clear_edits: an inplace edit changes the model, clearEdits() restores it", async () => {
    const before = await model.trace(prompt, (m) => ({ h: m.model.layers[1].output, logits: m.lm_head.output }))
    try {
      model.edit((m) => m.model.layers[1].output.set(0), { inplace: true })
      const l1 = await model.trace(prompt, (m) => m.model.layers[1].output)
      expect(allZero(l1)).toBe(true)
    } finally {
      model.clearEdits()
    }
    const after = await model.trace(prompt, (m) => ({ h: m.model.layers[1].output, logits: m.lm_head.output }))
    expect(noneZero(after.h)).toBe(true)
    expectClose(after.h, before.h, 0)
    expectClose(after.logits, before.logits, 0)
  })

  test("test_batched_editing: every row of a batch is edited (one invoke of two prompts, and two invokes)", async () => {
    const edited = model.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    // one invoke, two rows: the edit does not narrow the batch
    const batch = await edited.trace(["a", "b"], (m) => m.model.layers[0].mlp.output)
    expect(batch.shape[0]).toBe(2)
    expect(allZero(batch)).toBe(true)

    // two invokes of different prompts
    const out = await edited.trace((m, t) => {
      const a = t.invoke(prompt, () => ({ mlp: m.model.layers[0].mlp.output, logits: m.lm_head.output }))
      const b = t.invoke(promptB, () => ({ mlp: m.model.layers[0].mlp.output, logits: m.lm_head.output }))
      return { a, b }
    })
    expect(allZero(out.a.mlp)).toBe(true)
    expect(allZero(out.b.mlp)).toBe(true)
    expectClose(out.a.logits, await edited.trace(prompt, (m) => m.lm_head.output))
    expectClose(out.b.logits, await edited.trace(promptB, (m) => m.lm_head.output))
  })

  test("edits compose with per-trace interventions", async () => {
    const edited = model.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    const composed = await edited.trace(prompt, (m) => {
      m.model.layers[2].output.update((o) => o.mul(0.5))
      return m.lm_head.output
    })
    const both = await model.trace(prompt, (m) => {
      m.model.layers[0].mlp.output.set(0)
      m.model.layers[2].output.update((o) => o.mul(0.5))
      return m.lm_head.output
    })
    expectClose(composed, both)
    const editOnly = await edited.trace(prompt, (m) => m.lm_head.output)
    expect(editOnly.allClose(composed, 1e-3, 1e-3)).toBe(false)
  })

  test("edits apply to generate on every step (as t.all(() => ...set(0)))", async () => {
    const edited = model.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    const steps = 4
    const viaEdit = await edited.generate(prompt, { maxNewTokens: steps }, (m, t) => ({
      tokens: m.generator.output,
      logits: t.all(() => m.lm_head.output.at(":", -1))
    }))
    const explicit = await model.generate(prompt, { maxNewTokens: steps }, (m, t) => ({
      tokens: m.generator.output,
      logits: t.all(() => {
        m.model.layers[0].mlp.output.set(0)
        return m.lm_head.output.at(":", -1)
      })
    }))
    expect(viaEdit.tokens.toNumbers()).toEqual(explicit.tokens.toNumbers())
    expect(viaEdit.logits.length).toBe(steps)
    viaEdit.logits.forEach((l, s) => expectClose(l, explicit.logits[s]))
    // without a callback too, and the original model generates differently
    const tokens = await edited.generate(prompt, { maxNewTokens: steps })
    expect(tokens.toNumbers()).toEqual(explicit.tokens.toNumbers())
    const plainLogits = await model.generate(prompt, { maxNewTokens: steps }, (m, t) => t.all(() => m.lm_head.output.at(":", -1)))
    expect(plainLogits[0].allClose(viaEdit.logits[0], 1e-3, 1e-3)).toBe(false)
  })

  test("edits apply to every trace of a session", async () => {
    const edited = model.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    const out = await edited.session((s) => ({
      a: s.trace(prompt, (m) => m.lm_head.output),
      b: s.trace(promptB, (m) => m.model.layers[0].mlp.output)
    }))
    expectClose(out.a, await edited.trace(prompt, (m) => m.lm_head.output))
    expect(allZero(out.b)).toBe(true)
  })
})
