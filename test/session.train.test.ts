/**
 * Training inside a session: variables (`s.variable`, `set`, `update`) that
 * live across traces and loop passes, gradients of such values (`w.grad`),
 * and gradients flowing back through sets (the value a set puts into the
 * model is differentiated on to what it is made of; what it replaced gets
 * no gradient from the replaced rows).
 *
 * References are hand computations on `tiny_mlp` (layer1 = Linear(5, 10),
 * layer2 = Linear(10, 2), no activation, so every gradient is a product of
 * weights and inputs) and central finite differences of the loss on
 * stories260K.
 */
import { afterAll, beforeAll, describe, expect, test } from "vitest"
import { Errors, Graph, LanguageModel, NNsight, Tensor } from "../src/index.js"

const expectClose = (actual: unknown, expected: ReadonlyArray<number>, tol = 1e-5): void => {
  expect(actual).toBeInstanceOf(Tensor)
  const a = (actual as Tensor).toNumbers()
  expect(a.length).toBe(expected.length)
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i] - expected[i]) <= tol * Math.max(1, Math.abs(expected[i])))) expect.fail(`element ${i}: got ${a[i]}, want ${expected[i]}`)
  }
}

/** A seeded uniform generator (mulberry32), so failures reproduce. */
const rng = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const uniform = (shape: ReadonlyArray<number>, scale: number, seed: number): Tensor => {
  const r = rng(seed)
  return Tensor.from(Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => (r() * 2 - 1) * scale), "float32", shape)
}

let net: NNsight
const x = uniform([1, 5], 1, 7)
let w1: Array<number> // [10, 5], PyTorch layout
let b1: Array<number>
let w2: Array<number> // [2, 10]
beforeAll(async () => {
  net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
  const p = await net.trace(x, (m) => ({ w1: m.layer1.weight, b1: m.layer1.bias, w2: m.layer2.weight }))
  w1 = p.w1.toNumbers()
  b1 = p.b1.toNumbers()
  w2 = p.w2.toNumbers()
})
afterAll(() => net.close())

const xs = () => x.toNumbers()
const hidden = () => Array.from({ length: 10 }, (_, j) => b1[j] + xs().reduce((acc, xi, i) => acc + w1[j * 5 + i] * xi, 0))

describe("variables", () => {
  test("update accumulates across loop passes; the session returns the last value", async () => {
    const out = await net.session((s) => {
      const total = s.variable(0)
      const seen = s.list()
      s.iter([1, 2, 3, 4], (item) => {
        total.update((v) => v.add(item))
        seen.append(total.mul(1))
      })
      return { total, seen }
    })
    // graph-side arithmetic on numbers gives scalar tensors
    const num = (v: unknown) => (v instanceof Tensor ? v.toNumbers()[0] : v)
    expect(num(out.total)).toBe(10)
    expect((out.seen as ReadonlyArray<unknown>).map(num)).toEqual([1, 3, 6, 10])
  })

  test("readers recorded before a set see the old value, readers after it the new one", async () => {
    const out = await net.session((s) => {
      const v = s.variable(Tensor.from([1, 2, 3]))
      const before = v.mul(2)
      v.set(v.add(10))
      const after = v.mul(2)
      v.set(0)
      return { before, after, last: v }
    })
    expectClose(out.before, [2, 4, 6])
    expectClose(out.after, [22, 24, 26])
    expect(out.last).toBe(0)
  })

  test("a trace sets a variable from a module value; a later trace reads it", async () => {
    const out = await net.session((s) => {
      const keep = s.variable(0)
      s.trace(x, (m) => keep.set(m.layer1.output.clone()))
      const second = s.trace(x, (m) => {
        m.layer1.output.set(keep.mul(2))
        return m.layer2.output
      })
      return { keep, second }
    })
    expectClose(out.keep, hidden())
    const h2 = hidden().map((v) => v * 2)
    const b2 = (await net.trace(x, (m) => m.layer2.bias)).toNumbers()
    expectClose(out.second, [0, 1].map((k) => b2[k] + h2.reduce((a, hj, j) => a + w2[k * 10 + j] * hj, 0)), 1e-4)
  })

  test("starting from a proxy copies it: setting the variable leaves the proxy's value alone", async () => {
    const out = await net.session((s) => {
      const c = s.constant(Tensor.from([1, 2]))
      const v = s.variable(c)
      v.set(v.mul(3))
      return { c, v }
    })
    expectClose(out.c, [1, 2])
    expectClose(out.v, [3, 6])
  })
})

describe("training graphs on the wire", () => {
  test("a session with variables, their gradients and assignments round-trips through Graph.encode / Graph.decode", () => {
    const { graph } = net.recordSession((s) => {
      const w = s.variable(Tensor.zeros([10]))
      s.iter([1, 2], () => {
        s.trace(x, (m) => {
          m.layer1.output.update((h) => h.add(w))
          const g = w.grad
          m.layer2.output.sum().backward()
          w.update((v) => v.sub(g.mul(0.1)))
        })
      })
      return w
    })
    const text = JSON.stringify(Graph.encode(graph))
    expect(text).toContain('"_tag":"Assign"')
    expect(JSON.stringify(Graph.encode(Graph.decode(JSON.parse(text))))).toBe(text)
    expect(Graph.format(graph)).toMatch(/%\d+ := %\d+/)
  })
})

describe("gradients of values and through sets (tiny_mlp, by hand)", () => {
  test("a variable added to layer1's output: its gradient is column sums of layer2's weight, equal to the output's gradient", async () => {
    const out = await net.session((s) => {
      const shift = s.variable(Tensor.zeros([10]))
      return s.trace(x, (m) => {
        m.layer1.output.update((h) => h.add(shift))
        const g = shift.grad
        const downstream = m.layer1.output.grad
        m.layer2.output.sum().backward()
        return { g, downstream }
      })
    })
    const colSums = Array.from({ length: 10 }, (_, j) => w2[j] + w2[10 + j])
    expectClose(out.g, colSums)
    expectClose(out.downstream, colSums)
  })

  test("zero-ablating layer1 stops every gradient to layer1's weights; layer2 still sees its bias", async () => {
    const out = await net.trace(x, (m) => {
      m.layer1.output.set(0)
      const grads = { w1: m.layer1.weight.grad, b1: m.layer1.bias.grad, w2: m.layer2.weight.grad, b2: m.layer2.bias.grad, x: m.layer1.input.grad }
      m.layer2.output.sum().backward()
      return grads
    })
    expectClose(out.w1, new Array(50).fill(0))
    expectClose(out.b1, new Array(10).fill(0))
    expectClose(out.x, new Array(5).fill(0))
    expectClose(out.w2, new Array(20).fill(0))
    expectClose(out.b2, [1, 1])
  })

  test("a set whose value reads an earlier module value and a variable: gradients reach both", async () => {
    const a = uniform([10, 2], 0.5, 3)
    const out = await net.session((s) => {
      const A = s.variable(a)
      return s.trace(x, (m) => {
        // layer2 replaced by h @ A: layer2's own weights no longer matter
        m.layer2.output.set(m.layer2.input.matmul(A))
        const grads = { A: A.grad, w1: m.layer1.weight.grad, w2: m.layer2.weight.grad }
        m.layer2.output.sum().backward()
        return grads
      })
    })
    const h = hidden()
    const av = a.toNumbers()
    // dL/dA[j][k] = h[j]; dL/dh[j] = A[j][0] + A[j][1]; dL/dW1[j][i] = dL/dh[j] * x[i]
    expectClose(out.A, h.flatMap((hj) => [hj, hj]), 1e-4)
    expectClose(out.w1, Array.from({ length: 50 }, (_, n) => (av[Math.floor(n / 5) * 2] + av[Math.floor(n / 5) * 2 + 1]) * xs()[n % 5]), 1e-4)
    expectClose(out.w2, new Array(20).fill(0))
  })

  test("a gradient read on a value computed inside the forward pass is a typed error naming its line", async () => {
    const attempt = net.trace(x, (m) => {
      const h = m.layer1.output.mul(2)
      const g = h.grad
      m.layer2.output.sum().backward()
      return g
    })
    await expect(attempt).rejects.toBeInstanceOf(Errors.InvalidValue)
    await expect(attempt).rejects.toThrow(/session\.train\.test\.ts/)
    // the model is still usable
    expect((await net.trace(x, (m) => m.layer2.output)).shape).toEqual([1, 2])
  })
})

describe("a LoRA adapter's gradients on stories260K match finite differences", () => {
  let lm: LanguageModel
  beforeAll(async () => {
    lm = await LanguageModel.load("models/stories260K")
  })
  afterAll(() => lm.close())

  const prompt = "Once upon a time, there was a little"
  const target = 266
  /** The loss with the adapter x @ A @ B added to layer 2's MLP output. */
  const loss = async (a: Tensor, b: Tensor) =>
    (
      await lm.trace(prompt, (m) => {
        const mlp = m.model.layers[2].mlp
        mlp.output.update((o) => o.add(mlp.input.matmul(a).matmul(b)))
        return m.lm_head.output.at(0, -1).logSoftmax().at(target).neg()
      })
    ).toNumbers()[0]

  test("directional derivatives along the gradient equal its norm", async () => {
    const a0 = uniform([64, 4], 0.3, 11)
    const b0 = uniform([4, 64], 0.3, 12)
    const out = await lm.session((s) => {
      const A = s.variable(a0)
      const B = s.variable(b0)
      return s.trace(prompt, (m) => {
        const mlp = m.model.layers[2].mlp
        mlp.output.update((o) => o.add(mlp.input.matmul(A).matmul(B)))
        const l = m.lm_head.output.at(0, -1).logSoftmax().at(target).neg()
        const grads = { A: A.grad, B: B.grad }
        l.backward()
        return { ...grads, l }
      })
    })
    expect(Math.abs((out.l as Tensor).toNumbers()[0] - (await loss(a0, b0)))).toBeLessThan(1e-5)
    const ga = out.A.toNumbers()
    const gb = out.B.toNumbers()
    const norm = Math.sqrt([...ga, ...gb].reduce((acc, v) => acc + v * v, 0))
    expect(norm).toBeGreaterThan(1e-3)
    const eps = 1e-2
    const moved = (sign: number) => [
      Tensor.from(a0.toNumbers().map((v, i) => v + (sign * eps * ga[i]) / norm), "float32", [64, 4]),
      Tensor.from(b0.toNumbers().map((v, i) => v + (sign * eps * gb[i]) / norm), "float32", [4, 64])
    ] as const
    const up = await loss(...moved(1))
    const down = await loss(...moved(-1))
    const numeric = (up - down) / (2 * eps)
    expect(Math.abs(numeric - norm) / norm).toBeLessThan(2e-2)
  })
})
