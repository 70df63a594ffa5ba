/**
 * Trace errors: each is its typed class from `Errors`, names the line of this
 * file that recorded the failing operation, and leaves the model usable (a
 * normal trace right after it still matches PyTorch). The Effect form fails
 * with the same error in its failure channel.
 *
 * Lines are found by marker comments (`// @name`) on the recording line.
 */
import { afterAll, beforeAll, describe, expect, test } from "vitest"
import { readFileSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { Cause, Effect, Exit, Option } from "effect"
import { Errors, LanguageModel, Tensor } from "../src/index.js"

const file = "trace.errors.test.ts"
const source = readFileSync(fileURLToPath(import.meta.url), "utf8").split("\n")
/** The 1-based line holding the marker comment `// @name`. */
const lineOf = (name: string): number => {
  const lines = source.flatMap((l, i) => (l.trimEnd().endsWith(`// @${name}`) ? [i + 1] : []))
  if (lines.length !== 1) throw new Error(`marker @${name} found ${lines.length} times`)
  return lines[0]
}
const expectAt = (error: unknown, marker: string): void => {
  const where = `${file}:${lineOf(marker)}:`
  expect((error as Error).message).toContain(where)
  expect((error as { site: string }).site).toContain(where)
}

const failure = async (p: Promise<unknown>): Promise<unknown> => {
  try {
    await p
  } catch (e) {
    return e
  }
  throw new Error("expected the trace to fail")
}
const thrown = (f: () => unknown): unknown => {
  try {
    f()
  } catch (e) {
    return e
  }
  throw new Error("expected a throw")
}

interface RefTensor {
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number>
}
const ref = JSON.parse(readFileSync("test/fixtures/stories260K/reference.json", "utf8")) as {
  readonly inputs: Record<string, RefTensor>
  readonly outputs: Record<string, RefTensor>
  readonly hooks: ReadonlyArray<{ readonly module: string; readonly output: ReadonlyArray<RefTensor> }>
}
const tensor = (r: RefTensor): Tensor => Tensor.from([...r.data], r.dtype as "float32", r.shape)
const prompt = { input_ids: tensor(ref.inputs.input_ids), attention_mask: tensor(ref.inputs.attention_mask) }
const expectedLogits = tensor(ref.outputs.logits)

const expectClose = (actual: Tensor, expected: Tensor, tol = 1e-4): void => {
  expect(actual.shape).toEqual(expected.shape)
  const a = actual.toNumbers()
  const b = expected.toNumbers()
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i]))
    if (!(d <= tol)) expect.fail(`element ${i}: got ${a[i]}, want ${b[i]}`)
  }
}

let model: LanguageModel
beforeAll(async () => {
  model = await LanguageModel.load("models/stories260K")
})
afterAll(() => model.close())

/** The model still traces correctly: reads, a set and the logits match PyTorch. */
const expectHealthy = async (): Promise<void> => {
  const { logits, hidden } = await model.trace(prompt, (m) => ({ logits: m.lm_head.output, hidden: m.model.layers[2].output }))
  expectClose(logits, expectedLogits)
  expectClose(hidden, tensor(ref.hooks.find((h) => h.module === "model.layers.2")!.output[0]))
}

describe("errors name the user's line and leave the model usable", () => {
  test("out-of-range module index: m.model.layers[9]", async () => {
    const e = await failure(model.trace(prompt, (m) => m.model.layers[9].output)) // @oob
    expect(e).toBeInstanceOf(Errors.ModuleIndexOutOfRange)
    expect(e).toMatchObject({ _tag: "ModuleIndexOutOfRange", path: "model.layers", index: 9, size: 5 })
    expectAt(e, "oob")
    await expectHealthy()
  })

  test("out-of-range output index of a module with several outputs: layers[0].output.at(7)", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        const h = m.model.layers[0].output
        return h.at(7) // @oob-output
      })
    )
    expect(e).toBeInstanceOf(Errors.ModuleIndexOutOfRange)
    expect(e).toMatchObject({ _tag: "ModuleIndexOutOfRange", path: "model.layers.0", what: "output", index: 7, size: 3 })
    expectAt(e, "oob-output")
    await expectHealthy()
  })

  test("unknown module: m.model.nope", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        const x = m.model.layers[0].output
        return x.add(m.model.nope.output) // @unknown
      })
    )
    expect(e).toBeInstanceOf(Errors.UnknownModule)
    expect(e).toMatchObject({ _tag: "UnknownModule", path: "model", name: "nope" })
    expect((e as Errors.UnknownModule).available).toContain("layers")
    expectAt(e, "unknown")
    await expectHealthy()
  })

  test("early stop: the value read after t.stop() is Unavailable, the one before is there", async () => {
    const out = await model.trace(prompt, (m, t) => {
      const early = m.model.layers[2].output
      t.stop()
      const late = m.lm_head.output // @late
      return { early, late }
    })
    expectClose(out.early, tensor(ref.hooks.find((h) => h.module === "model.layers.2")!.output[0]))
    const e = thrown(() => out.late)
    expect(e).toBeInstanceOf(Errors.Unavailable)
    expect((e as Errors.Unavailable)._tag).toBe("Unavailable")
    expectAt(e, "late")
    await expectHealthy()
  })

  test("early stop: a trace returning only the unavailable value rejects with Unavailable", async () => {
    const e = await failure(
      model.trace(prompt, (m, t) => {
        t.stop()
        return m.lm_head.output // @late-only
      })
    )
    expect(e).toBeInstanceOf(Errors.Unavailable)
    expectAt(e, "late-only")
    await expectHealthy()
  })

  test("shape mismatch in a set: a [1, 14, 64] output set to [1, 3, 7]", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        m.model.layers[0].mlp.output.set(Tensor.zeros([1, 3, 7])) // @shape
        return m.lm_head.output
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expect((e as Errors.InvalidValue)._tag).toBe("InvalidValue")
    expectAt(e, "shape")
    await expectHealthy()
  })

  test("shape mismatch in a setAt: the last position ([1, 64]) set to [5]", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        m.model.layers[1].output.setAt([":", -1], Tensor.zeros([5])) // @shape-at
        return m.lm_head.output
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expectAt(e, "shape-at")
    await expectHealthy()
  })

  test("invalid index: a zero slice step, .at('1:2:0')", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        const h = m.model.layers[1].output
        return h.at("1:2:0") // @step
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expectAt(e, "step")
    await expectHealthy()
  })

  test("invalid index in a setAt: setAt([':', '::0'], 0)", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        m.model.layers[1].output.setAt([":", "::0"], 0) // @step-set
        return m.lm_head.output
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expectAt(e, "step-set")
    await expectHealthy()
  })

  test("invalid index: out of range, .at(0, 99) on [1, 14, 64]", async () => {
    const e = await failure(
      model.trace(prompt, (m) => {
        const h = m.model.layers[1].output
        return h.at(0, 99) // @range
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expectAt(e, "range")
    await expectHealthy()
  })

  test("an error in one invoke of a batched trace, then a batched trace that works", async () => {
    const e = await failure(
      model.trace((m, t) => {
        const src = t.invoke(prompt, () => m.model.layers[2].output.at(":", -1))
        return t.invoke(prompt, () => {
          m.model.layers[2].output.setAt([":", -1], src.at(":", "0:3")) // @batched
          return m.lm_head.output
        })
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expectAt(e, "batched")
    const [a, b] = await model.trace((m, t) => [t.invoke(prompt, () => m.lm_head.output), t.invoke(prompt, () => m.lm_head.output)])
    expectClose(a, expectedLogits)
    expectClose(b, expectedLogits)
  })
})

describe("the Effect API fails with the typed error in the failure channel", () => {
  const failed = async (effect: Effect.Effect<unknown, Errors.TraceError>): Promise<Errors.TraceError> => {
    const exit = await Effect.runPromiseExit(effect)
    expect(Exit.isFailure(exit)).toBe(true)
    if (!Exit.isFailure(exit)) throw new Error("unreachable")
    expect(Cause.hasDies(exit.cause)).toBe(false)
    const error = Cause.findErrorOption(exit.cause)
    expect(Option.isSome(error)).toBe(true)
    return Option.getOrThrow(error)
  }

  test("a recording error (ModuleIndexOutOfRange)", async () => {
    const e = await failed(model.effect.trace(prompt, (m) => m.model.layers[9].output)) // @effect-oob
    expect(e).toBeInstanceOf(Errors.ModuleIndexOutOfRange)
    expect(e._tag).toBe("ModuleIndexOutOfRange")
    expectAt(e, "effect-oob")
    await expectHealthy()
  })

  test("an execution error (InvalidValue from a set), and a good trace after it", async () => {
    const e = await failed(
      model.effect.trace(prompt, (m) => {
        m.model.layers[0].mlp.output.set(Tensor.zeros([2, 2])) // @effect-shape
        return m.lm_head.output
      })
    )
    expect(e).toBeInstanceOf(Errors.InvalidValue)
    expectAt(e, "effect-shape")
    const logits = await Effect.runPromise(model.effect.trace(prompt, (m) => m.lm_head.output))
    expectClose(logits, expectedLogits)
  })

  test("without an input: invokes through the Effect form", async () => {
    const e = await failed(
      model.effect.trace((m, t) =>
        t.invoke(prompt, () => m.model.nope.output) // @effect-unknown
      )
    )
    expect(e).toBeInstanceOf(Errors.UnknownModule)
    expectAt(e, "effect-unknown")
    await expectHealthy()
  })
})
