/**
 * How write passes use onnxruntime sessions. A write pattern runs on the
 * canonical block segments until it makes up most of the recent write
 * passes; then it gets its own sessions cut only where it writes; one such
 * pattern is kept at a time, and interleaved patterns never trade sessions.
 * Whatever the sessions, results are the same, and a repeated trace of the
 * same structure creates no new session.
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
// other session cuts may fuse operators differently: equal up to float rounding
const same = (a: Tensor, b: Tensor) => {
  expect(a.shape).toEqual(b.shape)
  const x = a.toNumbers()
  const y = b.toNumbers()
  for (let i = 0; i < x.length; i++) if (!(Math.abs(x[i] - y[i]) <= 1e-5 * Math.max(1, Math.abs(y[i])))) expect.fail(`element ${i}: ${x[i]} vs ${y[i]}`)
}

test("a repeated write pattern gets its own sessions once; results never change", async () => {
  const sessions = model.runtime.sessions
  const first = await ablate(1)()
  const afterFirst = sessions.created()
  const second = await ablate(1)()
  const afterSecond = sessions.created()
  // its own sessions: before and after the write
  expect(afterSecond - afterFirst).toBe(2)
  const third = await ablate(1)()
  expect(sessions.created()).toBe(afterSecond)
  same(second, first)
  same(third, first)
  // the same intervention on a plain run of a model edited to do it
  const edited = model.edit((m) => {
    m.model.layers[1].mlp.output.set(0)
  })
  same(await edited.trace(prompt, (m) => m.lm_head.output), first)
})

test("a pattern that comes to dominate replaces the previous pattern's sessions", async () => {
  const sessions = model.runtime.sessions
  for (let i = 0; i < 8; i++) await ablate(2)()
  const open = sessions.size()
  const made = sessions.created()
  for (let i = 0; i < 12; i++) await ablate(3)()
  // layer 3: two canonical splits of its block (its first runs), then its own
  // two sessions once it makes up most recent write passes, which release layer 2's two
  expect(sessions.created() - made).toBe(4)
  expect(sessions.size()).toBe(open + 2)
})

test("interleaved patterns (a sweep, a server's mixed load) never trade sessions back and forth", async () => {
  const sessions = model.runtime.sessions
  // warm every canonical split once
  for (const l of [0, 1, 2, 3, 4]) await ablate(l)()
  const before = sessions.created()
  for (let round = 0; round < 4; round++) for (const l of [0, 4, 0, 1, 4]) await ablate(l)()
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
