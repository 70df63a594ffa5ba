/**
 * nnsight's `tests/test_tiny.py` session, condition, iterator, stop and
 * builtins cases in nnsight-ts's form (`model.session((s) => ...)`,
 * `t.cond`, `s.iter`, `s.list`, `s.dict`, `s.apply`, `t.stop`, `s.stop`) on the
 * same net (`tiny_mlp`: layer1 = Linear(5, 10), layer2 = Linear(10, 2)) with a
 * random [1, 5] input; the DESIGN session example on stories260K against the
 * plain two-invoke patch; the session graph's JSON round trip; `log`.
 *
 * nnsight saves with `.save()` and reads `.value`; here what a callback
 * returns is saved, and reading a returned value that never ran throws
 * `Errors.Unavailable` (nnsight's `ValueError`). nnsight's in-place writes
 * (`out[:] = 1` changes the saved tensor) become sets on the hook, read back
 * by a read recorded after the set.
 */
import { afterAll, beforeAll, describe, expect, test, vi } from "vitest"
import { Errors, Graph, LanguageModel, NNsight, Tensor } from "../src/index.js"

const rand = (n = 5): Tensor => Tensor.from(Array.from({ length: n }, () => Math.random()), "float32", [1, n])

const expectClose = (actual: Tensor, expected: Tensor, tol = 1e-5): void => {
  expect(actual.shape).toEqual(expected.shape)
  const a = actual.toNumbers()
  const b = expected.toNumbers()
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i] - b[i]) <= tol * Math.max(1, Math.abs(b[i])))) expect.fail(`element ${i}: got ${a[i]}, want ${b[i]}`)
  }
}

const expectUnavailable = (read: () => unknown): void => {
  let error: unknown
  try {
    read()
  } catch (e) {
    error = e
  }
  expect(error).toBeInstanceOf(Errors.Unavailable)
}

const all = (t: Tensor, v: number): boolean => t.toNumbers().every((x) => x === v)

let net: NNsight
let x: Tensor
beforeAll(async () => {
  net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
})
afterAll(() => net.close())
// torch.rand((1, input_size)) for every test, like the tiny_input fixture
const input = (): Tensor => (x = rand())

describe("conditions inside a trace (t.cond)", () => {
  test("test_true_conditional_protocol: a true condition runs its body", async () => {
    const num = 5
    const out = await net.trace(input(), (m, t) => {
      let l1: unknown
      t.cond(num > 0, () => {
        m.layer1.output.setAt([":"], 1)
        l1 = m.layer1.output
      })
      return { l1 }
    })
    expect(out.l1).toBeInstanceOf(Tensor)
    const l1 = out.l1 as Tensor
    expect(l1.shape).toEqual([1, 10])
    expect(all(l1, 1)).toBe(true)
  })

  test("test_false_conditional_protocol: a false condition skips its body, the rest runs", async () => {
    const num = 5
    const reference = await net.trace(input(), (m) => m.layer2.output)
    const out = await net.trace(x, (m, t) => {
      let l1: unknown
      t.cond(num < 0, () => {
        m.layer1.output.setAt([":"], 1)
        l1 = m.layer1.output
      })
      // the condition does not persist outside its body
      return { l1, l2: m.layer2.output }
    })
    expectUnavailable(() => out.l1)
    expect(out.l2).toBeInstanceOf(Tensor)
    expectClose(out.l2, reference)
  })

  test("test_node_as_condition: a tensor computed in the trace decides", async () => {
    const out = await net.trace(input(), (m, t) => {
      m.layer1.output.setAt([":", 0], 1)
      let l1: unknown
      t.cond(m.layer1.output.at(":", 0).ne(1), () => {
        m.layer1.output.setAt([":"], 1)
        l1 = m.layer1.output
      })
      return { l1, first: m.layer1.output.at(":", 0) }
    })
    expectUnavailable(() => out.l1)
    expect(out.first.toNumbers()).toEqual([1])
  })

  test("test_multiple_dependent_conditionals: later conditions see earlier conditional sets", async () => {
    const num = 5
    const out = await net.trace(input(), (m, t) => {
      t.cond(num > 0, () => m.layer1.output.setAt([":"], 1))
      t.cond(m.layer1.output.at(":", 0).ne(1), () => m.layer2.output.setAt([":"], 2))
      t.cond(m.layer1.output.at(":", 0).eq(1), () => m.layer2.output.setAt([":"], 3))
      return m.layer2.output
    })
    expect(out.shape).toEqual([1, 2])
    expect(all(out, 3)).toBe(true)
  })

  test("test_nested_conditionals: bodies nest; an untaken outer body skips its taken inner one", async () => {
    const num = 5
    const out = await net.trace(input(), (m, t) => {
      let l1: unknown
      let l2: unknown
      t.cond(num > 0, () => {
        t.cond(num > 0, () => m.layer1.output.setAt([":"], 1))
        t.cond(num < 0, () => m.layer1.output.setAt([":"], 2))
        l1 = m.layer1.output
      })
      t.cond(num < 0, () => {
        m.layer2.output.setAt([":"], 0)
        t.cond(num > 0, () => {
          l2 = m.layer2.output
        })
      })
      return { l1, l2 }
    })
    expect(out.l1).toBeInstanceOf(Tensor)
    expect(all(out.l1 as Tensor, 1)).toBe(true)
    expectUnavailable(() => out.l2)
  })

  test("an else branch runs when the condition is false", async () => {
    const out = await net.trace(input(), (m, t) => {
      t.cond(
        m.layer1.output.at(":", 0).gt(1e9),
        () => m.layer1.output.setAt([":"], 7),
        () => m.layer1.output.setAt([":"], -7)
      )
      return m.layer1.output
    })
    expect(all(out, -7)).toBe(true)
  })
})

describe("stopping", () => {
  test("test_early_stop_protocol: values recorded before t.stop() come back, later ones are unavailable", async () => {
    const reference = await net.trace(input(), (m) => m.layer1.output)
    const out = await net.trace(x, (m, t) => {
      const l1 = m.layer1.output
      t.stop()
      const l2 = m.layer2.output
      return { l1, l2 }
    })
    expect(out.l1).toBeInstanceOf(Tensor)
    expectClose(out.l1, reference)
    expectUnavailable(() => out.l2)
  })

  test("test_tracer_stop: an operation recorded after t.stop() never runs", async () => {
    const out = await net.trace(input(), (m, t) => {
      const l1 = m.layer1.output
      t.stop()
      const l1Double = l1.mul(2)
      return { l1, l1Double }
    })
    expect(out.l1.shape).toEqual([1, 10])
    expectUnavailable(() => out.l1Double)
  })

  test("test_stop_forward_pass_in_loop: a stopped trace per loop item, 3 results", async () => {
    const inputs = [rand(), rand(), rand()]
    const res = await net.session((s) => {
      const list = s.list()
      s.iter(inputs, (batch) => {
        const hs = s.trace(batch, (m, t) => {
          const h = m.layer1.output
          t.stop()
          return h
        })
        list.append(hs)
      })
      return list
    })
    const items = res as unknown as ReadonlyArray<Tensor>
    expect(items.length).toBe(3)
    for (let k = 0; k < 3; k++) expectClose(items[k], await net.trace(inputs[k], (m) => m.layer1.output))
  })

  test("test_sequential_graph_based_context_exit: s.stop() ends the loop, then the session", async () => {
    const l = await net.session((s) => {
      const l = s.list()
      l.append(0)
      s.iter([1, 2, 3, 4], (item) => {
        s.cond(item.eq(3), () => s.stop())
        l.append(item)
      })
      l.append(5)
      s.stop()
      l.append(6)
      return l
    })
    expect(l).toEqual([0, 1, 2, 5])
  })

  test("test_bridged_node_cleanup: values of the loop pass that stopped are unavailable", async () => {
    const out = await net.session((s) => {
      const l = s.list()
      let after: unknown
      s.iter([0, 1, 2], (item) => {
        s.cond(item.eq(2), () => s.stop())
        l.append(item)
        after = item.mul(10)
      })
      return { l, after }
    })
    expect(out.l).toEqual([0, 1])
    expectUnavailable(() => out.after)
  })
})

describe("sessions", () => {
  test("test_conditional_trace: a trace inside a true session condition runs", async () => {
    const reference = await net.trace(input(), (m) => m.output)
    const num = 5
    const out = await net.session((s) => {
      let output: unknown
      s.cond(num > 0, () => {
        output = s.trace(x, (m) => m.output)
      })
      return { output }
    })
    expect(out.output).toBeInstanceOf(Tensor)
    expectClose(out.output as Tensor, reference)
  })

  test("a trace inside a false session condition never runs", async () => {
    const out = await net.session((s) => {
      let output: unknown
      s.cond(false, () => {
        output = s.trace(input(), (m) => m.output)
      })
      return { output }
    })
    expectUnavailable(() => out.output)
  })

  test("test_conditional_iteration: traces in a loop under a condition append to a session list: [0, 2]", async () => {
    const result = await net.session((s) => {
      const result = s.list()
      s.iter([0, 1, 2], (item) => {
        s.cond(item.mod(2).eq(0), () => {
          s.trace(input(), () => {
            result.append(item)
          })
        })
      })
      return result
    })
    expect(result).toEqual([0, 2])
  })

  test("test_bridge_protocol: a session value flows into a trace", async () => {
    const l1 = await net.session((s) => {
      const val = s.apply((v: number) => Math.trunc(v), 0)
      return s.trace(input(), (m) => {
        m.layer1.output.setAt([":"], val)
        return m.layer1.output
      })
    })
    expect(l1.shape).toEqual([1, 10])
    expect(all(l1, 0)).toBe(true)
  })

  test("test_external_proxy_intervention_executed_locally: a value read in trace 1 is set in trace 2 and read back", async () => {
    const x2 = rand()
    const out = await net.session((s) => {
      const l1 = s.trace(input(), (m) => m.layer1.output)
      const patched = s.trace(x2, (m) => {
        m.layer1.output.set(l1)
        m.layer1.output.setAt([":", 2], 5)
        return { l1: m.layer1.output, y: m.output }
      })
      return { l1, patched }
    })
    const reference = await net.trace(x, (m) => m.layer1.output)
    expectClose(out.l1, reference)
    const read = out.patched.l1
    expect(read.get(0, 2)).toBe(5)
    const want = reference.toNumbers()
    read.toNumbers().forEach((v, j) => j !== 2 && expect(v).toBeCloseTo(want[j], 6))
    // the forward pass of trace 2 went on from the patched value
    const y = await net.trace(x2, (m) => {
      m.layer1.output.set(read)
      return m.output
    })
    expectClose(out.patched.y, y)
  })

  test("test_nested_iterator: loops nest over a list of lists: [0, 1, 2]", async () => {
    const l2 = await net.session((s) => {
      const l = s.list()
      l.append([0])
      l.append([1])
      l.append([2])
      const l2 = s.list()
      s.iter(l, (item) => s.iter(item, (item2) => l2.append(item2)))
      return l2
    })
    expect(l2).toEqual([0, 1, 2])
  })

  test("test_nnsight_builtins: lists, strings and dictionaries made in the graph or by local functions agree", async () => {
    const out = await net.session((s) => {
      const nnList = s.list()
      const seshList = s.apply(() => [])
      const applyList = s.apply(Array.of)
      s.iter([nnList, seshList, applyList], (l) => {
        l.append(s.apply(() => 0))
        l.append(s.apply(String, "Hello World"))
        const d = s.dict()
        d.put("a", "1")
        l.append(d)
      })
      const graphSide = s.list(0, "Hello World")
      const dict = s.dict()
      dict.put("a", "1")
      graphSide.append(dict)
      const fromFunction = s.apply((d: Record<string, string>) => ({ ...d }), dict)
      return { nnList, seshList, applyList, graphSide, fromFunction }
    })
    const want = [0, "Hello World", { a: "1" }]
    expect(out.nnList).toEqual(want)
    expect(out.seshList).toEqual(out.nnList)
    expect(out.applyList).toEqual(out.seshList)
    expect(out.graphSide).toEqual(want)
    expect(out.fromFunction).toEqual({ a: "1" })
  })

  test("s.apply runs a local function on values of a trace", async () => {
    const seen: Array<number> = []
    const out = await net.session((s) => {
      const l1 = s.trace(input(), (m) => m.layer1.output)
      const total = s.apply((t: Tensor) => {
        seen.push(t.size)
        return t.toNumbers().reduce((a, b) => a + b, 0)
      }, l1)
      return { l1, total }
    })
    expect(seen).toEqual([10])
    expect(out.total as unknown as number).toBeCloseTo(out.l1.toNumbers().reduce((a, b) => a + b, 0), 5)
  })

  test("t.apply runs a local function inside a trace, its value feeds a set", async () => {
    const out = await net.trace(input(), (m, t) => {
      const doubled = t.apply((v: Tensor) => Tensor.from(v.toNumbers().map((a) => a * 2), "float32", v.shape), m.layer1.output)
      const before = m.layer1.output.clone()
      m.layer1.output.set(doubled)
      return { before, after: m.layer1.output }
    })
    expectClose(out.after, Tensor.from(out.before.toNumbers().map((a) => a * 2), "float32", [1, 10]))
  })

  test("t.log and s.log print when the graph runs, not while recording", async () => {
    const spy = vi.spyOn(console, "log").mockImplementation(() => undefined)
    try {
      const graph = net.recordSession((s) => {
        s.log("recorded")
      })
      expect(graph.graph.nodes.some((n) => n._tag === "Log")).toBe(true)
      expect(spy).not.toHaveBeenCalled()
      await net.trace(input(), (m, t) => {
        t.log("layer2", m.layer2.output)
      })
      expect(spy).toHaveBeenCalledTimes(1)
      expect(spy.mock.calls[0][0]).toBe("layer2")
      expect(spy.mock.calls[0][1]).toBeInstanceOf(Tensor)
      spy.mockClear()
      await net.session((s) => {
        s.iter([1, 2], (i) => s.log("item", i))
        s.trace(x, (m, t) => t.log("in a session trace", m.layer1.output.shape))
      })
      expect(spy.mock.calls.map((c) => c[0])).toEqual(["item", "item", "in a session trace"])
      expect(spy.mock.calls.slice(0, 2).map((c) => c[1])).toEqual([1, 2])
    } finally {
      spy.mockRestore()
    }
  })

  test("a session graph round-trips through Graph.encode / Graph.decode (JSON)", () => {
    const { graph } = net.recordSession((s) => {
      const h = s.trace(rand(), (m, t) => {
        t.cond(m.layer1.output.at(":", 0).gt(0), () => m.layer1.output.setAt([":", 0], 0))
        return m.layer1.output
      })
      const acc = s.list()
      const d = s.dict()
      d.put("k", "v")
      s.iter([0, 1, 2], (i) => s.cond(i.mod(2).eq(0), () => acc.append(i), () => s.log(i)))
      s.stop()
      return { h, acc, d, f: s.apply((a: number) => a + 1, 1) }
    })
    const tags = new Set(Graph.flatten(graph.nodes).map((n) => n._tag))
    for (const tag of ["Trace", "Iter", "Cond", "ListNew", "DictNew", "Append", "Call", "Log", "Stop", "Value", "Hook", "Set"]) {
      expect(tags.has(tag as never)).toBe(true)
    }
    const text = JSON.stringify(Graph.encode(graph))
    const back = Graph.decode(JSON.parse(text))
    expect(Graph.equals(back, graph)).toBe(true)
    expect(back).toEqual(graph)
    expect(Graph.hash(back)).toBe(Graph.hash(graph))
    expect(JSON.stringify(Graph.encode(back))).toBe(text)
  })
})

describe("the DESIGN session example (stories260K)", () => {
  let model: LanguageModel
  beforeAll(async () => {
    model = await LanguageModel.load("models/stories260K")
  })
  afterAll(() => model.close())

  const promptA = "Once upon a time, there was a little boy named"
  const promptB = "Once upon a time, there was a little girl named"

  test("acc is [0, 2] and the logits equal a two-invoke patch trace", async () => {
    expect(model.tokenizer.encode(promptA).length).toBe(model.tokenizer.encode(promptB).length)
    const { logits, acc } = await model.session((s) => {
      const clean = s.trace(promptA, (m) => m.model.layers[1].output)
      const acc = s.list()
      s.iter([0, 1, 2], (i) => s.cond(i.mod(2).eq(0), () => acc.append(i)))
      const logits = s.trace(promptB, (m) => {
        m.model.layers[1].output.set(clean)
        return m.lm_head.output
      })
      return { logits, acc }
    })
    expect(acc).toEqual([0, 2])
    const patched = await model.trace((m, t) => {
      const clean = t.invoke(promptA, () => m.model.layers[1].output)
      return t.invoke(promptB, () => {
        m.model.layers[1].output.set(clean)
        return m.lm_head.output
      })
    })
    expect(logits.shape).toEqual([1, 14, 512])
    expectClose(logits, patched, 1e-5)
    // and the patch did something: promptB alone differs
    const plain = await model.trace(promptB, (m) => m.lm_head.output)
    expect(plain.allClose(logits, 1e-3, 1e-3)).toBe(false)
  })
})
