/**
 * How write passes use onnxruntime sessions. A set whose value is known
 * before the pass (a zero ablation) is fed to one whole-model session in the
 * tensor's place. A write that needs the pass's own values (a scaling) cuts
 * the model: its pattern runs on the canonical block segments until it makes
 * up most of the recent write passes; then it gets its own sessions cut only
 * where it writes; one such pattern is kept at a time, and interleaved
 * patterns never trade sessions. Whatever the sessions, results are the
 * same, and a repeated trace of the same structure creates no new session.
 */
import { afterAll, beforeAll, expect, test } from "vitest"
import { LanguageModel, type Tensor } from "../src/index.js"

let model: LanguageModel
beforeAll(async () => {
  model = await LanguageModel.load("models/stories260K")
})
afterAll(() => model.close())

const prompt = "Once upon a time, there was a little girl named"
const ablate = (layer: number) => () => model.trace(prompt, (m) => {
  m.model.layers[layer].mlp.output.set(0)
  return m.lm_head.output
})
// a write that needs the pass's own value: the model is cut where it writes
const scale = (layer: number) => () => model.trace(prompt, (m) => {
  m.model.layers[layer].mlp.output.update((h) => h.mul(0.5))
  return m.lm_head.output
})
// other session cuts may fuse operators differently: equal up to float rounding
const same = (a: Tensor, b: Tensor) => {
  expect(a.shape).toEqual(b.shape)
  const x = a.toNumbers()
  const y = b.toNumbers()
  for (let i = 0; i < x.length; i++) if (!(Math.abs(x[i] - y[i]) <= 1e-5 * Math.max(1, Math.abs(y[i])))) expect.fail(`element ${i}: ${x[i]} vs ${y[i]}`)
}

test("a repeated write pattern gets its own sessions once; results never change", async () => {
  const sessions = model.runtime.sessions
  const first = await scale(1)()
  const afterFirst = sessions.created()
  const second = await scale(1)()
  const afterSecond = sessions.created()
  // its own sessions: before and after the write
  expect(afterSecond - afterFirst).toBe(2)
  const third = await scale(1)()
  expect(sessions.created()).toBe(afterSecond)
  same(second, first)
  same(third, first)
  // the same intervention on a plain run of a model edited to do it
  const edited = model.edit((m) => {
    m.model.layers[1].mlp.output.update((h) => h.mul(0.5))
  })
  same(await edited.trace(prompt, (m) => m.lm_head.output), first)
})

test("a pattern that comes to dominate replaces the previous pattern's sessions", async () => {
  const sessions = model.runtime.sessions
  for (let i = 0; i < 8; i++) await scale(2)()
  const open = sessions.size()
  const made = sessions.created()
  for (let i = 0; i < 12; i++) await scale(3)()
  // layer 3: two canonical splits of its block (its first runs), then its own
  // two sessions once it makes up most recent write passes, which release layer 2's two
  expect(sessions.created() - made).toBe(4)
  expect(sessions.size()).toBe(open + 2)
})

test("interleaved patterns (a sweep, a server's mixed load) never trade sessions back and forth", async () => {
  const sessions = model.runtime.sessions
  // warm every canonical split once
  for (const l of [0, 1, 2, 3, 4]) await scale(l)()
  const before = sessions.created()
  for (let round = 0; round < 4; round++) for (const l of [0, 4, 0, 1, 4]) await scale(l)()
  expect(sessions.created()).toBe(before)
})

test("a repeated backward pass runs its forward on its own sessions; gradients never change", async () => {
  const sessions = model.runtime.sessions
  const run = () =>
    model.trace(prompt, (m) => {
      const g = m.model.layers[2].output.at(0).grad
      const w = m.model.layers[1].mlp.down_proj.weight.grad
      m.lm_head.output.at(0, -1, 317).backward()
      return { g, w }
    })
  const first = await run()
  for (let i = 0; i < 16; i++) await run()
  const made = sessions.created()
  const last = await run()
  expect(sessions.created()).toBe(made)
  same(last.g, first.g)
  same(last.w, first.w)
})

test("a set to a value known before the pass is fed to one session: no cut, the cut's result, no new session on repeat", async () => {
  // a fresh model: the cut would make a session per block segment; fed, the run makes one
  const fresh = await LanguageModel.load("models/stories260K")
  const zero = () =>
    fresh.trace(prompt, (m) => {
      m.model.layers[1].mlp.output.set(0)
      return m.lm_head.output
    })
  const first = await zero()
  expect(fresh.runtime.sessions.created()).toBe(1)
  for (let i = 0; i < 3; i++) same(await zero(), first)
  expect(fresh.runtime.sessions.created()).toBe(1)
  await fresh.close()
  // the same ablation written as an update needs the pass's value, so it cuts: the same logits
  const cut = await model.trace(prompt, (m) => {
    m.model.layers[1].mlp.output.update((h) => h.mul(0))
    return m.lm_head.output
  })
  same(first, cut)
  // reads around the set see the computed value, then the set one
  const { before: b, after: a } = await model.trace(prompt, (m) => {
    const before = m.model.layers[1].mlp.output.clone()
    m.model.layers[1].mlp.output.set(0)
    return { before, after: m.model.layers[1].mlp.output }
  })
  expect(b.toNumbers().some((x) => x !== 0)).toBe(true)
  expect(a.toNumbers().every((x) => x === 0)).toBe(true)
})
