/**
 * nnsight's `tests/test_tiny.py` tracing semantics, in nnsight-ts's form, on
 * the same net (`tiny_mlp`: layer1 = Linear(5, 10), layer2 = Linear(10, 2)):
 * saving an output, early stop, setting an output and reading it back, and a
 * pluggable backend that sees the recorded graphs.
 */
import { afterAll, beforeAll, describe, expect, test } from "vitest"
import { readFileSync } from "node:fs"
import { Effect, Layer } from "effect"
import { Backend, Errors, type Graph, type Local, NNsight, Tensor } from "../src/index.js"

const path = "test/fixtures/tiny_mlp/model.onnx"
interface RefTensor {
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number>
}
const ref = JSON.parse(readFileSync("test/fixtures/tiny_mlp/reference.json", "utf8")) as {
  readonly inputs: { readonly x: RefTensor }
  readonly outputs: { readonly y: RefTensor }
  readonly hooks: ReadonlyArray<{ readonly module: string; readonly output: ReadonlyArray<RefTensor> }>
}
const tensor = (r: RefTensor): Tensor => Tensor.from([...r.data], "float32", r.shape)
const x = tensor(ref.inputs.x)
const layer1Out = tensor(ref.hooks.find((h) => h.module === "layer1")!.output[0])
const layer2Out = tensor(ref.hooks.find((h) => h.module === "layer2")!.output[0])

const expectClose = (actual: Tensor, expected: Tensor, tol = 1e-5): void => {
  expect(actual.shape).toEqual(expected.shape)
  const a = actual.toNumbers()
  const b = expected.toNumbers()
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i] - b[i]) <= tol * Math.max(1, Math.abs(b[i])))) expect.fail(`element ${i}: got ${a[i]}, want ${b[i]}`)
  }
}

/** `x @ w^T + b` for x [n, k], w [m, k] (PyTorch's Linear layout), b [m]. */
const linear = (input: Tensor, w: Tensor, b: Tensor): Tensor => {
  const [n, k] = input.shape
  const [mm, k2] = w.shape
  expect(k2).toBe(k)
  expect(b.shape).toEqual([mm])
  const xs = input.toNumbers()
  const ws = w.toNumbers()
  const bs = b.toNumbers()
  const out = new Float32Array(n * mm)
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < mm; j++) {
      let s = bs[j]
      for (let q = 0; q < k; q++) s += xs[i * k + q] * ws[j * k + q]
      out[i * mm + j] = s
    }
  }
  return new Tensor("float32", [n, mm], out)
}

let net: NNsight
beforeAll(async () => {
  net = await NNsight.load(path)
})
afterAll(() => net.close())

describe("test_tiny.py in nnsight-ts", () => {
  test("test_tiny: a saved layer2.output comes back as a Tensor with PyTorch's value", async () => {
    const hs = await net.trace(x, (m) => m.layer2.output)
    expect(hs).toBeInstanceOf(Tensor)
    expect(hs.dtype).toBe("float32")
    expectClose(hs, layer2Out)
    expectClose(hs, tensor(ref.outputs.y))
  })

  test("a random input: layer outputs equal a hand computation from the parameters read in the same trace", async () => {
    const input = Tensor.from([[0.1, -0.2, 0.3, 0.5, -1.5]])
    const out = await net.trace(input, (m) => ({
      w1: m.layer1.weight,
      b1: m.layer1.bias,
      w2: m.layer2.weight,
      b2: m.layer2.bias,
      h: m.layer1.output,
      y: m.layer2.output
    }))
    expect(out.w1.shape).toEqual([10, 5])
    expect(out.w2.shape).toEqual([2, 10])
    const h = linear(input, out.w1, out.b1)
    expectClose(out.h, h)
    expectClose(out.y, linear(h, out.w2, out.b2))
  })

  test("test_early_stop_protocol: l1 saved before t.stop() is available; l2 after it is Unavailable", async () => {
    const out = await net.trace(x, (m, t) => {
      const l1 = m.layer1.output
      t.stop()
      const l2 = m.layer2.output
      return { l1, l2 }
    })
    expect(out.l1).toBeInstanceOf(Tensor)
    expectClose(out.l1, layer1Out)
    expect(() => out.l2).toThrow(Errors.Unavailable)
    // and the model still runs whole afterwards
    expectClose(await net.trace(x, (m) => m.output), tensor(ref.outputs.y))
  })

  test("early stop with other result shapes: in a nested record and in a list only the late value throws", async () => {
    const nested = await net.trace(x, (m, t) => {
      const l1 = m.layer1.output
      t.stop()
      return { inner: { l1, l2: m.layer2.output } }
    })
    expectClose(nested.inner.l1, layer1Out)
    expect(() => nested.inner.l2).toThrow(Errors.Unavailable)
    const list = await net.trace(x, (m, t) => {
      const l1 = m.layer1.output
      t.stop()
      return [l1, m.layer2.output]
    })
    expectClose(list[0], layer1Out)
    expect(() => list[1]).toThrow(Errors.Unavailable)
  })

  for (const how of ["setAt([':'], 1)", "set(1)"] as const) {
    test(`test_true_conditional_protocol (no condition): layer1.output.${how}, then reads give ones and y = 1 @ W2^T + b2`, async () => {
      const out = await net.trace(x, (m) => {
        if (how === "set(1)") m.layer1.output.set(1)
        else m.layer1.output.setAt([":"], 1)
        return { l1: m.layer1.output, l2in: m.layer2.input, y: m.output, w: m.layer2.weight, b: m.layer2.bias }
      })
      expect(out.l1.shape).toEqual([2, 10])
      expect(out.l1.toNumbers()).toEqual(new Array(20).fill(1))
      expect(out.l2in.toNumbers()).toEqual(new Array(20).fill(1))
      // by hand: y[i][j] = sum_k W[j][k] + b[j]
      const w = out.w.toNumbers()
      const b = out.b.toNumbers()
      const row = [0, 1].map((j) => w.slice(j * 10, j * 10 + 10).reduce((s, v) => s + v, 0) + b[j])
      expectClose(out.y, Tensor.from([row, row]))
    })
  }

  test("test_external_proxy_intervention: l1[:, 2] = 5 shows in the saved layer1 output", async () => {
    const l1 = await net.trace(x, (m) => {
      m.layer1.output.setAt([":", 2], 5)
      return m.layer1.output
    })
    expect(l1.at(":", 2).toNumbers()).toEqual([5, 5])
    expectClose(l1.at(":", "3:"), layer1Out.at(":", "3:"))
  })
})

describe("a pluggable backend sees the recorded graph", () => {
  /** A backend that records the graphs it receives and runs them locally. */
  const recording = () => {
    const graphs: Array<Graph.Graph> = []
    const service: Backend["Service"] = {
      execute: (request) =>
        Effect.suspend(() => {
          graphs.push(request.graph)
          return Backend.local.execute(request)
        })
    }
    return { graphs, service }
  }

  /** The graph of `m.layer2.output`: one Hook node, returned by reference. */
  const expectLayer2Graph = (graphs: ReadonlyArray<Graph.Graph>) => {
    expect(graphs).toHaveLength(1)
    const [g] = graphs
    expect(g.invokes).toBe(1)
    expect(g.nodes).toHaveLength(1)
    expect(g.nodes[0]).toMatchObject({
      _tag: "Hook",
      id: 0,
      ref: { module: "layer2", call: 0, invoke: 0, point: "output", index: 0 }
    })
    expect(g.nodes[0].site).toContain("trace.tiny.test.ts:")
    expect(g.result).toEqual({ _tag: "Ref", id: 0 })
  }

  test("given at load: NNsight.load(path, { backend })", async () => {
    const { graphs, service } = recording()
    const model = await NNsight.load(path, { backend: service })
    try {
      const hs = await model.trace(x, (m) => m.layer2.output)
      expectClose(hs, layer2Out)
      expectLayer2Graph(graphs)
    } finally {
      await model.close()
    }
  })

  test("given per trace: trace(input, fn, { backend })", async () => {
    const { graphs, service } = recording()
    const hs = await net.trace(x, (m) => m.layer2.output, { backend: service })
    expectClose(hs, layer2Out)
    expectLayer2Graph(graphs)
    // the model's own backend is untouched
    await net.trace(x, (m) => m.layer2.output)
    expect(graphs).toHaveLength(1)
  })

  test("provided as a service: Effect.provide(Layer.succeed(Backend, impl))", async () => {
    const { graphs, service } = recording()
    const hs = await Effect.runPromise(
      net.effect.trace(x, (m) => m.layer2.output).pipe(Effect.provide(Layer.succeed(Backend, service)))
    )
    expectClose(hs, layer2Out)
    expectLayer2Graph(graphs)
  })

  test("an early-stop graph: Hook, Stop, Hook, and a result record of two refs", async () => {
    const { graphs, service } = recording()
    const out = await net.trace(
      x,
      (m, t) => {
        const l1 = m.layer1.output
        t.stop()
        return { l1, l2: m.layer2.output }
      },
      { backend: service }
    )
    expectClose(out.l1, layer1Out)
    expect(() => out.l2).toThrow(Errors.Unavailable)
    const [g] = graphs
    expect(g.nodes.map((n) => n._tag)).toEqual(["Hook", "Stop", "Hook"])
    expect(g.result).toEqual({ _tag: "Record", fields: { l1: { _tag: "Ref", id: 0 }, l2: { _tag: "Ref", id: 2 } } })
  })

  test("a backend that computes nothing: its outcome is what the trace returns", async () => {
    const seen: Array<Graph.Graph> = []
    const fake: Backend["Service"] = {
      execute: (request) =>
        Effect.sync((): Local.Outcome => {
          seen.push(request.graph)
          expect(Object.keys(request.feeds)).toEqual(["x"])
          expect(request.rows).toEqual([{ start: 0, count: 2 }])
          return { values: new Map([[0, Tensor.full([2, 2], 7)]]), unavailable: new Map() }
        })
    }
    const hs = await net.trace(x, (m) => m.layer2.output, { backend: fake })
    expect(hs.toNumbers()).toEqual([7, 7, 7, 7])
    expect(seen).toHaveLength(1)
  })
})
