/**
 * Gradients through the trace API (`.grad`, `.grad.set`, `backward()`):
 * (1) nnsight's `test_grad_setting` on tiny_mlp, against PyTorch's `grad_setting`;
 * (2) every `grad` experiment of the fixtures (tiny_mlp, twice, tiny_gpt2,
 *     llama_tiny) and of stories260K, within 1e-4 relative
 *     (max |ours - torch| <= 1e-4 * max |torch| per tensor);
 * (3) two backward() calls in one trace: each `.grad` belongs to the first
 *     backward() recorded after it;
 * (4) errors, and backward() on a non-scalar (seeded with ones);
 * (5) properties on tiny_mlp with random inputs, against hand computations.
 *
 * ONNX keeps Linear weights transposed (`onnx::MatMul_*`); `.weight.grad`
 * comes back in PyTorch's layout. A tied weight is two ONNX initializers, so
 * `lm_head.weight.grad` is the lm_head-use-only part of PyTorch's total and
 * the embedding's `.weight.grad` the embedding-use-only part.
 */
import { afterAll, beforeAll, describe, expect } from "vitest"
import { fc, test } from "@fast-check/vitest"
import { readFileSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { type DType, type Envoy, Errors, LanguageModel, NNsight, Tensor } from "../src/index.js"

interface RefTensor {
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number>
}
interface Reference {
  readonly inputs: Record<string, RefTensor>
  readonly experiments: ReadonlyArray<{ readonly name: string; readonly result: Record<string, RefTensor> }>
  readonly tokens?: { readonly ids_a: ReadonlyArray<number>; readonly lily: number }
}

const reference = (name: string): Reference => JSON.parse(readFileSync(`test/fixtures/${name}/reference.json`, "utf8"))
const tensor = (r: RefTensor): Tensor => Tensor.from([...r.data], r.dtype as DType.DType, r.shape)
const inputsOf = (r: Record<string, RefTensor>): Record<string, Tensor> =>
  Object.fromEntries(Object.entries(r).map(([k, v]) => [k, tensor(v)]))
const experiment = (ref: Reference, name: string): Record<string, RefTensor> => {
  const e = ref.experiments.find((x) => x.name === name)
  if (e === undefined) throw new Error(`no experiment ${name}`)
  return e.result
}

/** max |actual - expected| <= tol * max |expected|, same shape. */
const expectRel = (actual: Tensor, expected: RefTensor | Tensor, tol = 1e-4): void => {
  const want = expected instanceof Tensor ? expected : tensor(expected)
  expect(actual.shape).toEqual(want.shape)
  const a = actual.toNumbers()
  const b = want.toNumbers()
  let diff = 0
  let scale = 0
  let at = -1
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i])
    if (!(d <= diff)) {
      diff = d
      at = i
    }
    scale = Math.max(scale, Math.abs(b[i]))
  }
  if (!(diff <= tol * scale)) {
    expect.fail(`max |diff| ${diff} at flat index ${at} (got ${a[at]}, want ${b[at]}) exceeds ${tol} * max |ref| ${scale}`)
  }
}
const expectExact = (actual: Tensor, expected: Tensor): void => {
  expect(actual.shape).toEqual(expected.shape)
  expect(actual.toNumbers()).toEqual(expected.toNumbers())
}

// -- small dense helpers (float64 accumulation) -------------------------------

/** A [r, c] matrix of a tensor's numbers. */
const mat = (t: Tensor): { readonly r: number; readonly c: number; readonly v: ReadonlyArray<number> } => {
  expect(t.shape.length).toBe(2)
  return { r: t.shape[0], c: t.shape[1], v: t.toNumbers() }
}
/** a^T @ b for a [n, p], b [n, q]: [p, q]. */
const tMatmul = (a: Tensor, b: Tensor): Tensor => {
  const A = mat(a)
  const B = mat(b)
  expect(B.r).toBe(A.r)
  const out = new Float32Array(A.c * B.c)
  for (let i = 0; i < A.c; i++) {
    for (let j = 0; j < B.c; j++) {
      let s = 0
      for (let n = 0; n < A.r; n++) s += A.v[n * A.c + i] * B.v[n * B.c + j]
      out[i * B.c + j] = s
    }
  }
  return new Tensor("float32", [A.c, B.c], out)
}
/** a @ b for a [n, k], b [k, m]. */
const matmul = (a: Tensor, b: Tensor): Tensor => {
  const A = mat(a)
  const B = mat(b)
  expect(B.r).toBe(A.c)
  const out = new Float32Array(A.r * B.c)
  for (let i = 0; i < A.r; i++) {
    for (let j = 0; j < B.c; j++) {
      let s = 0
      for (let k = 0; k < A.c; k++) s += A.v[i * A.c + k] * B.v[k * B.c + j]
      out[i * B.c + j] = s
    }
  }
  return new Tensor("float32", [A.r, B.c], out)
}
const scale = (t: Tensor, k: number): Tensor => Tensor.from(t.toNumbers().map((v) => v * k), "float32", t.shape)
/** Sum over rows: [n, c] -> [c]. */
const sumRows = (t: Tensor): Tensor => {
  const A = mat(t)
  return Tensor.from(Array.from({ length: A.c }, (_, j) => Array.from({ length: A.r }, (_, i) => A.v[i * A.c + j]).reduce((p, q) => p + q, 0)), "float32", [A.c])
}
/** a + b elementwise. */
const plus = (a: Tensor, b: Tensor): Tensor => {
  expect(a.shape).toEqual(b.shape)
  const bs = b.toNumbers()
  return Tensor.from(a.toNumbers().map((v, i) => v + bs[i]), "float32", a.shape)
}
const onesLike = (t: Tensor): Tensor => Tensor.full([...t.shape], 1, "float32")

/** The envoy of a dotted module path. */
const mod = (m: Envoy, path: string): Envoy => path.split(".").reduce<Envoy>((e, k) => e[k], m)

// ---------------------------------------------------------------------------

describe("tiny_mlp", () => {
  const ref = reference("tiny_mlp")
  const x = tensor(ref.inputs.x)
  const grad = experiment(ref, "grad")
  const setting = experiment(ref, "grad_setting")
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
  })
  afterAll(() => net.close())

  test("test_grad_setting: the gradient read after .grad.set is twice the one read before; layer1's parameter grads double", async () => {
    const out = await net.trace(x, (m) => {
      const before = m.layer1.output.grad.clone()
      m.layer1.output.grad.set(m.layer1.output.grad.clone().mul(2))
      const after = m.layer1.output.grad
      const params = { w1: m.layer1.weight.grad, b1: m.layer1.bias.grad, w2: m.layer2.weight.grad, b2: m.layer2.bias.grad }
      m.output.sum().backward()
      return { before, after, ...params }
    })
    expectExact(out.after, scale(out.before, 2))
    expectRel(out.before, setting["layer2.input.grad.original"])
    expectRel(out.after, setting["layer2.input.grad.after_set"])
    expectRel(out.before, grad["layer1.output.grad"])
    expectRel(out.w1, setting["layer1.weight.grad"])
    expectRel(out.b1, setting["layer1.bias.grad"])
    expectRel(out.w2, setting["layer2.weight.grad"])
    expectRel(out.b2, setting["layer2.bias.grad"])
    // against `grad`: layer1's double, layer2's are unchanged
    expectRel(out.w1, scale(tensor(grad["layer1.weight.grad"]), 2))
    expectRel(out.b1, scale(tensor(grad["layer1.bias.grad"]), 2))
    expectRel(out.w2, grad["layer2.weight.grad"])
    expectRel(out.b2, grad["layer2.bias.grad"])
  })

  test("grad.update(fn) is grad.set(fn(grad)); a set on layer2's input (the same tensor) acts the same", async () => {
    const a = await net.trace(x, (m) => {
      m.layer1.output.grad.update((g) => g.mul(2))
      const w1 = m.layer1.weight.grad
      m.output.sum().backward()
      return w1
    })
    expectRel(a, setting["layer1.weight.grad"])
    const b = await net.trace(x, (m) => {
      const before = m.layer2.input.grad.clone()
      m.layer2.input.grad.update((g) => g.mul(2))
      const after = m.layer2.input.grad
      const w1 = m.layer1.weight.grad
      m.output.sum().backward()
      return { before, after, w1 }
    })
    expectExact(b.after, scale(b.before, 2))
    expectRel(b.w1, setting["layer1.weight.grad"])
  })

  test("grad: every gradient of the reference (loss y.sum())", async () => {
    const out = await net.trace(x, (m) => {
      const r = {
        h: m.layer1.output.grad,
        in2: m.layer2.input.grad,
        w1: m.layer1.weight.grad,
        b1: m.layer1.bias.grad,
        w2: m.layer2.weight.grad,
        b2: m.layer2.bias.grad
      }
      m.output.sum().backward()
      return r
    })
    expectRel(out.h, grad["layer1.output.grad"])
    expectRel(out.in2, grad["layer2.input.grad"])
    expectRel(out.w1, grad["layer1.weight.grad"])
    expectRel(out.b1, grad["layer1.bias.grad"])
    expectRel(out.w2, grad["layer2.weight.grad"])
    expectRel(out.b2, grad["layer2.bias.grad"])
  })

  test("two backward() calls: each .grad belongs to the first backward() after it (y.sum(), then (y*y).sum())", async () => {
    const plain = await net.trace(x, (m) => ({ w2: m.layer2.weight, h: m.layer1.output, y: m.output }))
    const out = await net.trace(x, (m) => {
      const first = { h: m.layer1.output.grad, w1: m.layer1.weight.grad, w2: m.layer2.weight.grad, b2: m.layer2.bias.grad }
      const y = m.output
      y.sum().backward()
      const second = { h: m.layer1.output.grad, w1: m.layer1.weight.grad, w2: m.layer2.weight.grad, b2: m.layer2.bias.grad }
      y.mul(y).sum().backward()
      return { first, second }
    })
    // loss1 = sum(y): dL/dy = 1; loss2 = sum(y^2): dL/dy = 2y
    for (const [got, dy] of [
      [out.first, onesLike(plain.y)],
      [out.second, scale(plain.y, 2)]
    ] as const) {
      const dh = matmul(dy, plain.w2)
      expectRel(got.h, dh, 1e-5)
      expectRel(got.w2, tMatmul(dy, plain.h), 1e-5)
      expectRel(got.b2, sumRows(dy), 1e-5)
      expectRel(got.w1, tMatmul(dh, x), 1e-5)
    }
    expectRel(out.first.h, grad["layer1.output.grad"])
    expectRel(out.first.w1, grad["layer1.weight.grad"])
  })

  test("two backward() calls: a gradient set for the first does not change the second", async () => {
    const out = await net.trace(x, (m) => {
      m.layer1.output.grad.set(0)
      const w1First = m.layer1.weight.grad
      const y = m.output
      y.sum().backward()
      const w1Second = m.layer1.weight.grad
      const hSecond = m.layer1.output.grad
      y.sum().backward()
      return { w1First, w1Second, hSecond }
    })
    expectExact(out.w1First, Tensor.zeros([10, 5]))
    expectRel(out.w1Second, grad["layer1.weight.grad"])
    expectRel(out.hSecond, grad["layer1.output.grad"])
  })

  test("backward() on a non-scalar seeds it with ones (PyTorch would ask for a scalar): grads equal those of its sum", async () => {
    const viaSum = await net.trace(x, (m) => {
      const w1 = m.layer1.weight.grad
      m.output.sum().backward()
      return w1
    })
    const direct = await net.trace(x, (m) => {
      const r = { w1: m.layer1.weight.grad, h: m.layer1.output.grad }
      m.output.mul(1).backward()
      return r
    })
    const hookItself = await net.trace(x, (m) => {
      const r = { w1: m.layer1.weight.grad, h: m.layer1.output.grad }
      m.output.backward()
      return r
    })
    for (const r of [direct, hookItself]) {
      expectRel(r.w1, viaSum, 1e-6)
      expectRel(r.h, grad["layer1.output.grad"])
    }
  })

  test("invokes: a .grad gives its invoke's rows; a .grad.set in one invoke changes only what flows back from its rows", async () => {
    const [x0, x1] = [x.at("0:1"), x.at("1:2")]
    const plain = await net.trace(x, (m) => m.layer2.weight)
    const dh = matmul(Tensor.full([1, 2], 1, "float32"), plain) // d sum(y_row) / d h_row
    const out = await net.trace((m, t) => {
      const a = t.invoke(x0, () => {
        const h = m.layer1.output.grad
        m.layer1.output.grad.set(0)
        return { h, y: m.output }
      })
      return t.invoke(x1, () => {
        const r = { h: m.layer1.output.grad, w1: m.layer1.weight.grad }
        // the loss reads both invokes' outputs
        m.output.sum().add(a.y.sum()).backward()
        return { a: a.h, ...r }
      })
    })
    expectRel(out.a, dh, 1e-6)
    expectRel(out.h, dh, 1e-6)
    // invoke 0's rows were zeroed: only row 1 reaches layer1.weight
    expectRel(out.w1, tMatmul(dh, x1), 1e-5)
  })

  test("a module value read by the loss and by the rest of the model: both paths add up", async () => {
    const out = await net.trace(x, (m) => {
      const r = { h: m.layer1.output.grad, b1: m.layer1.bias.grad }
      m.output.sum().add(m.layer1.output.sum()).backward()
      return r
    })
    const want = tensor(grad["layer1.output.grad"])
    expectRel(out.h, Tensor.from(want.toNumbers().map((v) => v + 1), "float32", want.shape))
    expectRel(out.b1, sumRows(out.h), 1e-6)
  })

  // BUG 1 (Local.ts runBackward): gradients are served at the cut after their producer, and
  // fire(border) runs for every border but the last (n, the end of the model): a .grad or
  // .grad.set of a tensor made by the model's last node (its output, the logits) is never served.
  test("the model's final output: .grad is dL/dy (ones for y.sum()), m.output.grad the same", async () => {
    const out = await net.trace(x, (m) => {
      const r = { y2: m.layer2.output.grad, y: m.output.grad }
      m.output.sum().backward()
      return r
    })
    expectExact(out.y2, Tensor.full([2, 2], 1, "float32"))
    expectExact(out.y, Tensor.full([2, 2], 1, "float32"))
  })

  test("the model's final output: .grad.set(G) replaces dL/dy (layer1.output.grad = G @ W2, layer2.weight.grad = G^T @ h)", async () => {
    const plain = await net.trace(x, (m) => ({ w2: m.layer2.weight, h: m.layer1.output }))
    const G = Tensor.from([
      [1, 0],
      [0, -2]
    ], "float32")
    const out = await net.trace(x, (m) => {
      m.layer2.output.grad.set(G)
      const r = { h: m.layer1.output.grad, w2: m.layer2.weight.grad }
      m.output.sum().backward()
      return r
    })
    expectRel(out.h, matmul(G, plain.w2), 1e-6)
    expectRel(out.w2, tMatmul(G, plain.h), 1e-6)
  })

  // BUG 2 (Local.ts / Backprop.lossGradients): only Hook nodes are leaves of the loss; a
  // parameter read into the loss (m.layer1.weight) is lowered as a constant, so its direct
  // gradient is silently dropped, and a loss made of parameters only crashes onnxruntime.
  test("a parameter read by the loss gets that gradient too (y.sum() + 0.5 * |W1|^2: W1's grad gains W1)", async () => {
    const out = await net.trace(x, (m) => {
      const g = m.layer1.weight.grad
      const w = m.layer1.weight
      m.output.sum().add(w.mul(w).sum().mul(0.5)).backward()
      return { g, w }
    })
    const base = tensor(grad["layer1.weight.grad"])
    expectRel(out.g, Tensor.from(base.toNumbers().map((v, i) => v + out.w.toNumbers()[i]), "float32", base.shape))
  })

  test("a loss of a parameter only: weight.sum().backward() gives weight.grad = ones (as PyTorch)", async () => {
    const g = await net.trace(x, (m) => {
      const g = m.layer1.weight.grad
      m.layer1.weight.sum().backward()
      return g
    })
    expectExact(g, Tensor.full([10, 5], 1, "float32"))
  })

  describe("errors", () => {
    const source = readFileSync(fileURLToPath(import.meta.url), "utf8").split("\n")
    const lineOf = (marker: string): number => {
      const lines = source.flatMap((l, i) => (l.trimEnd().endsWith(`// @${marker}`) ? [i + 1] : []))
      if (lines.length !== 1) throw new Error(`marker @${marker} found ${lines.length} times`)
      return lines[0]
    }
    const failure = async (p: Promise<unknown>): Promise<unknown> => {
      try {
        await p
      } catch (e) {
        return e
      }
      throw new Error("expected the trace to fail")
    }
    const expectAt = (error: unknown, marker: string) => {
      const where = `trace.grad.test.ts:${lineOf(marker)}:`
      expect((error as Error).message).toContain(where)
      expect((error as { site: string }).site).toContain(where)
    }

    test("a .grad with no backward() in the trace: InvalidValue naming its line", async () => {
      const e = await failure(
        net.trace(x, (m) => {
          const g = m.layer1.output.grad // @noBackward
          return { g, y: m.output }
        })
      )
      expect(e).toBeInstanceOf(Errors.InvalidValue)
      expectAt(e, "noBackward")
    })

    test("a .grad read after the last backward(): InvalidValue naming its line", async () => {
      const e = await failure(
        net.trace(x, (m) => {
          const a = m.layer1.output.grad
          m.output.sum().backward()
          const b = m.layer1.weight.grad // @afterBackward
          return { a, b }
        })
      )
      expect(e).toBeInstanceOf(Errors.InvalidValue)
      expectAt(e, "afterBackward")
    })

    test("a .grad.set with no backward() after it: InvalidValue naming its line", async () => {
      const e = await failure(
        net.trace(x, (m) => {
          m.layer1.output.grad.set(0) // @setNoBackward
          return m.output
        })
      )
      expect(e).toBeInstanceOf(Errors.InvalidValue)
      expectAt(e, "setNoBackward")
    })

    // BUG 3 (Backprop.lossGradients): a loss that reads no module value or parameter builds a
    // backward model with no inputs, and onnxruntime fails to create its session (ExecutionError
    // with an onnxruntime-internal message). PyTorch raises ("does not require grad").
    test("backward() of a constant: InvalidValue naming the backward() line", async () => {
      const e = await failure(
        net.trace(x, (m, t) => {
          const g = m.layer1.weight.grad
          t.constant(3).backward() // @constantLoss
          return g
        })
      )
      expect(e).toBeInstanceOf(Errors.InvalidValue)
      expectAt(e, "constantLoss")
    })

    test("a .grad of a value computed in the trace (not a module value or parameter): InvalidValue naming its line", async () => {
      const e = await failure(
        net.trace(x, (m) => {
          const y = m.output.mul(2)
          const g = y.grad // @opGrad
          y.sum().backward()
          return g
        })
      )
      expect(e).toBeInstanceOf(Errors.InvalidValue)
      expectAt(e, "opGrad")
    })

    test("the model still works after those errors", async () => {
      const out = await net.trace(x, (m) => {
        const h = m.layer1.output.grad
        m.output.sum().backward()
        return h
      })
      expectRel(out, grad["layer1.output.grad"])
    })
  })

  describe("properties (random inputs, hand computations)", () => {
    const row = fc.array(fc.float({ min: -4, max: 4, noNaN: true, noDefaultInfinity: true }), { minLength: 5, maxLength: 5 })
    let w2: Tensor
    beforeAll(async () => {
      w2 = await net.trace(x, (m) => m.layer2.weight)
    })

    test.prop([fc.array(row, { minLength: 1, maxLength: 4 })], { numRuns: 6 })(
      "d sum(y) / d layer1.output = ones @ W2 (every row: W2 summed over outputs)",
      async (rows) => {
        const input = Tensor.from(rows, "float32", [rows.length, 5])
        const g = await net.trace(input, (m) => {
          const g = m.layer1.output.grad
          m.output.sum().backward()
          return g
        })
        const colSums = sumRows(w2)
        const want = Tensor.from(rows.flatMap(() => colSums.toNumbers()), "float32", [rows.length, 10])
        expectRel(g, want, 1e-6)
        expectRel(g, matmul(Tensor.full([rows.length, 2], 1, "float32"), w2), 1e-6)
      }
    )

    test.prop(
      [
        fc.integer({ min: 1, max: 4 }).chain((n) =>
          fc.tuple(
            fc.array(row, { minLength: n, maxLength: n }),
            fc.array(fc.array(fc.float({ min: -4, max: 4, noNaN: true, noDefaultInfinity: true }), { minLength: 10, maxLength: 10 }), {
              minLength: n,
              maxLength: n
            })
          )
        )
      ],
      { numRuns: 6 }
    )("setting layer1.output's gradient to G gives layer1.weight.grad = G^T @ x, layer1.bias.grad = sum of G's rows", async ([rows, gs]) => {
      const input = Tensor.from(rows, "float32", [rows.length, 5])
      const G = Tensor.from(gs, "float32", [gs.length, 10])
      const out = await net.trace(input, (m) => {
        m.layer1.output.grad.set(G)
        const r = { w1: m.layer1.weight.grad, b1: m.layer1.bias.grad, after: m.layer1.output.grad }
        m.output.sum().backward()
        return r
      })
      expectExact(out.after, G)
      expectRel(out.w1, tMatmul(G, input), 1e-5)
      expectRel(out.b1, sumRows(G), 1e-5)
    })
  })
})

// ---------------------------------------------------------------------------

describe("twice (shared is called twice)", () => {
  const ref = reference("twice")
  const grad = experiment(ref, "grad")
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load("test/fixtures/twice/model.onnx")
  })
  afterAll(() => net.close())

  test("grad: shared's output at each call; shared.weight.grad sums both uses; inp.weight.grad", async () => {
    const out = await net.trace(inputsOf(ref.inputs), (m) => {
      const call0 = m.shared.output.grad
      const call1 = m.shared.next().output.grad
      const r = { call0, call1, shared: m.shared.weight.grad, inp: m.inp.weight.grad }
      m.output.sum().backward()
      return r
    })
    expectRel(out.call0, grad["shared.output.call0.grad"])
    expectRel(out.call1, grad["shared.output.call1.grad"])
    expectRel(out.shared, grad["shared.weight.grad"])
    expectRel(out.inp, grad["inp.weight.grad"])
  })

  test("a .grad.set at shared's second call replaces what flows back from there (hand computation through act and call 0)", async () => {
    const x = inputsOf(ref.inputs)
    const plain = await net.trace(x, (m) => {
      const s0 = m.shared
      const r0 = { in0: s0.input, out0: s0.output }
      const s1 = m.shared.next()
      return { ...r0, in1: s1.input, w: m.shared.weight }
    })
    const G = Tensor.from([
      [1, -1, 0.5, 2],
      [0, 3, -2, 1]
    ], "float32")
    // .next() moves `shared` to its second call for the rest of the trace: read call 0 first
    const out = await net.trace(x, (m) => {
      const r = { call0: m.shared.output.grad, shared: m.shared.weight.grad }
      m.shared.next().output.grad.set(G)
      m.output.sum().backward()
      return r
    })
    // call 1: y1 = act(out0) W^T + b, so d/d out0 = (G @ W) * [out0 > 0]
    const gw = matmul(G, plain.w).toNumbers()
    const mask = plain.out0.toNumbers()
    const g0 = Tensor.from(gw.map((v, i) => (mask[i] > 0 ? v : 0)), "float32", [2, 4])
    expectRel(out.call0, g0, 1e-6)
    // shared.weight.grad = call 1's use (G^T @ act(out0) = G^T @ in1) + call 0's (g0^T @ in0)
    expectRel(out.shared, plus(tMatmul(G, plain.in1), tMatmul(g0, plain.in0)), 1e-5)
    const zero = await net.trace(x, (m) => {
      const r = { call0: m.shared.output.grad, shared: m.shared.weight.grad, inp: m.inp.weight.grad }
      m.shared.next().output.grad.set(0)
      m.output.sum().backward()
      return r
    })
    expectExact(zero.call0, Tensor.zeros([2, 4]))
    expectExact(zero.shared, Tensor.zeros([4, 4]))
    expectExact(zero.inp, Tensor.zeros([4, 4]))
  })
})

// ---------------------------------------------------------------------------

describe("tiny_gpt2 (lm_head tied to transformer.wte: two ONNX initializers)", () => {
  const ref = reference("tiny_gpt2")
  const grad = experiment(ref, "grad")
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load("test/fixtures/tiny_gpt2/model.onnx")
  })
  afterAll(() => net.close())

  test("grad (loss logits[:, -1, 5].sum()): block outputs/inputs, lm_head and wte weights (by use)", async () => {
    const out = await net.trace(inputsOf(ref.inputs), (m) => {
      const r = {
        h0: m.transformer.h[0].output.grad,
        h1in: m.transformer.h[1].input.grad,
        lmHead: m.lm_head.weight.grad,
        wte: m.transformer.wte.weight.grad
      }
      m.lm_head.output.at(":", -1, 5).sum().backward()
      return r
    })
    expectRel(out.h0, grad["transformer.h.0.output[0].grad"])
    expectRel(out.h1in, grad["transformer.h.1.input.grad"])
    expectRel(out.lmHead, grad["lm_head.weight.grad.lm_head_use_only"])
    expectRel(out.wte, grad["transformer.wte.weight.grad.embedding_use_only"])
    // the two parts add up to PyTorch's total of the tied parameter
    const total = plus(out.lmHead, out.wte)
    expectRel(total, grad["lm_head.weight.grad"])
    expectRel(total, grad["transformer.wte.weight.grad"])
  })

  test("a .grad.set(0) at block 1's input (the residual stream) zeroes everything before it, not lm_head's", async () => {
    const out = await net.trace(inputsOf(ref.inputs), (m) => {
      m.transformer.h[1].input.grad.set(0)
      const r = {
        h0: m.transformer.h[0].output.grad, // the same tensor: read after the set, it is the new gradient
        lmHead: m.lm_head.weight.grad,
        wte: m.transformer.wte.weight.grad,
        wpe: m.transformer.wpe.weight.grad
      }
      m.lm_head.output.at(":", -1, 5).sum().backward()
      return r
    })
    expectExact(out.h0, Tensor.zeros([2, 6, 32]))
    expectExact(out.wte, Tensor.zeros([64, 32]))
    expectExact(out.wpe, Tensor.zeros([...out.wpe.shape]))
    expectRel(out.lmHead, grad["lm_head.weight.grad.lm_head_use_only"])
  })
})

describe("llama_tiny (untied)", () => {
  const ref = reference("llama_tiny")
  const grad = experiment(ref, "grad")
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load("test/fixtures/llama_tiny/model.onnx")
  })
  afterAll(() => net.close())

  test("grad (loss logits[:, -1, 5].sum()): layer outputs/inputs, lm_head and embedding weights", async () => {
    const out = await net.trace(inputsOf(ref.inputs), (m) => {
      const r = {
        l0: m.model.layers[0].output.grad,
        l1in: m.model.layers[1].input.grad,
        lmHead: m.lm_head.weight.grad,
        embed: m.model.embed_tokens.weight.grad
      }
      m.lm_head.output.at(":", -1, 5).sum().backward()
      return r
    })
    expectRel(out.l0, grad["model.layers.0.output[0].grad"])
    expectRel(out.l1in, grad["model.layers.1.input.grad"])
    expectRel(out.lmHead, grad["lm_head.weight.grad"])
    expectRel(out.embed, grad["model.embed_tokens.weight.grad"])
  })
})

describe("stories260K (lm_head tied to model.embed_tokens: two ONNX initializers)", () => {
  const ref = reference("stories260K")
  const grad = experiment(ref, "grad")
  let model: LanguageModel
  beforeAll(async () => {
    model = await LanguageModel.load("models/stories260K")
  })
  afterAll(() => model.close())

  test("grad (loss logits[0, -1, 317]): layer 1 output, layer 3 input, lm_head / embedding (by use), norm, down_proj", async () => {
    const prompt = { input_ids: tensor(ref.inputs.input_ids), attention_mask: tensor(ref.inputs.attention_mask) }
    expect(ref.tokens!.lily).toBe(317)
    const out = await model.trace(prompt, (m) => {
      const r = {
        l1: m.model.layers[1].output.grad,
        l3in: m.model.layers[3].input.grad,
        lmHead: m.lm_head.weight.grad,
        embed: m.model.embed_tokens.weight.grad,
        norm: mod(m, "model.norm").weight.grad,
        down: m.model.layers[0].mlp.down_proj.weight.grad
      }
      const loss = m.lm_head.output.at(0, -1, 317)
      loss.backward()
      return { ...r, loss }
    })
    expectRel(out.loss.reshape(1), grad["loss"], 1e-5)
    expectRel(out.l1, grad["model.layers.1.output[0].grad"])
    expectRel(out.l3in, grad["model.layers.3.input[0].grad"])
    expectRel(out.lmHead, grad["lm_head.weight.grad.lm_head_use_only"])
    expectRel(out.embed, grad["model.embed_tokens.weight.grad.embedding_use_only"])
    expectRel(out.norm, grad["model.norm.weight.grad"])
    expectRel(out.down, grad["model.layers.0.mlp.down_proj.weight.grad"])
    const total = plus(out.lmHead, out.embed)
    expectRel(total, grad["lm_head.weight.grad"])
  })

  // BUG 1 again: the logits are made by the model's last node
  test("lm_head.output.grad (the logits) is one-hot at [0, -1, 317]", async () => {
    const prompt = { input_ids: tensor(ref.inputs.input_ids), attention_mask: tensor(ref.inputs.attention_mask) }
    const g = await model.trace(prompt, (m) => {
      const g = m.lm_head.output.grad
      m.lm_head.output.at(0, -1, 317).backward()
      return g
    })
    const want = new Float32Array(14 * 512)
    want[13 * 512 + 317] = 1
    expectExact(g, new Tensor("float32", [1, 14, 512], want))
  })
})
