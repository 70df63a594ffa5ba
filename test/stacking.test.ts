/**
 * Stacking (co-batched jobs of one graph sharing one invoke), on
 * stories260K:
 * (1) the rules: graphs whose operations keep rows apart stack (the load
 *     test's three kinds among them); graphs with an operation that mixes
 *     rows, moves them off the first axis or writes their count do not;
 * (2) the property that matters: for random graphs mixing both kinds of
 *     operation, over random prompts, one to two rows a job, a co-batched
 *     group (`Server.runGroup`) gives each job what it gets alone, whether
 *     its graph stacked or not.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fc } from "@fast-check/vitest"
import { Effect, Exit } from "effect"
import { Backend, type Envoy, LanguageModel, Tensor } from "../src/index.js"
import * as Scan from "../src/backends/Scan.js"
import type * as Tracer from "../src/core/Tracer.js"
import * as Server from "../src/remote/Server.js"
import * as Stacking from "../src/remote/Stacking.js"
import * as Arb from "../src/testing.js"

let lm: LanguageModel
let serverLm: LanguageModel

beforeAll(async () => {
  lm = await LanguageModel.load("models/stories260K")
  serverLm = await LanguageModel.load("models/stories260K")
}, 60_000)

afterAll(async () => {
  await lm?.close()
  await serverLm?.close()
})

const LENGTH = 6
const prompt = (seed: number) => Array.from({ length: LENGTH }, (_, k) => 1 + ((seed * 37 + k * 11) % 500))

/** The values of `fn`'s graph that hold rows, or undefined when its jobs cannot stack. */
const rowwise = (fn: (m: Envoy) => unknown) => {
  const { graph } = lm.record(prompt(1), fn)
  const { feeds, rows } = lm.batch([prompt(1)])
  const { values, hooks } = Scan.run(lm.runtime.loaded, { graph, inputs: feeds, rows })
  return Stacking.rowwise(graph, values, hooks)
}

describe("which graphs stack", () => {
  const h = (m: Envoy) => m.model.layers[1].output as Tracer.TensorProxy
  const stacks: ReadonlyArray<readonly [string, (m: Envoy) => unknown]> = [
    ["a read", (m) => h(m)],
    ["the last position's logits", (m) => m.lm_head.output.at(":", -1)],
    ["a scaled layer and a mean over features", (m) => {
      m.model.layers[2].output.update((x) => x.mul(0.5))
      return { logits: m.lm_head.output.at(":", -1), h: m.model.layers[4].output.mean(-1) }
    }],
    ["a zeroed MLP and a softmax", (m) => {
      m.model.layers[0].mlp.output.set(0)
      return m.model.layers[1].self_attn.output.softmax(-1).at(":", -1)
    }],
    ["a matmul of a row with its own transpose", (m) => h(m).matmul(h(m).transpose(-2, -1))],
    ["a matmul with a parameter", (m) => h(m).matmul(m.lm_head.weight.transpose(0, 1))],
    ["reshape(-1, ...) that keeps rows", (m) => h(m).reshape(-1, LENGTH * 64)],
    ["top-k along the features", (m) => h(m).topk(3, -1).values],
    ["the ellipsis", (m) => h(m).at("...", 0)],
    ["unsqueeze after the rows", (m) => h(m).unsqueeze(1).squeeze(1)],
    ["a constant that broadcasts", (m) => h(m).add(Tensor.zeros([1, 1, 64]))],
    ["a set of a value from another layer", (m) => {
      m.model.layers[3].output.set(m.model.layers[1].output.mul(2))
      return m.lm_head.output.at(":", -1).argmax(-1)
    }]
  ]
  const mixes: ReadonlyArray<readonly [string, (m: Envoy) => unknown]> = [
    ["a mean over everything", (m) => h(m).mean()],
    ["a sum over the rows", (m) => h(m).sum(0)],
    ["a softmax over the rows", (m) => h(m).softmax(0)],
    ["a transpose that moves the rows", (m) => h(m).transpose(0, 1)],
    ["a reshape that flattens the rows", (m) => h(m).reshape(-1)],
    ["a reshape that writes the row count", (m) => h(m).reshape(1, LENGTH, 64)],
    ["picking a row", (m) => h(m).mul(1).at(0)],
    ["a new first axis", (m) => h(m).unsqueeze(0)],
    ["a squeeze of every size-1 axis", (m) => h(m).squeeze()],
    ["a concatenation along the rows", (m) => h(m).cat([h(m)], 0)],
    ["a matmul that contracts the rows", (m) => h(m).at(":", 0).transpose(0, 1).matmul(h(m).at(":", 0))],
    ["a constant with rows of its own", (m) => h(m).add(Tensor.zeros([2, LENGTH, 64]))],
    ["the shape", (m) => h(m).shape],
    ["a set of a value that mixes rows", (m) => {
      m.model.layers[3].output.set(m.model.layers[1].output.mean(0, true))
      return m.lm_head.output
    }]
  ]
  it.each(stacks)("stacks: %s", (_, fn) => {
    expect(rowwise(fn)).toBeDefined()
  })
  it.each(mixes)("does not stack: %s", (_, fn) => {
    expect(rowwise(fn)).toBeUndefined()
  })
  it("matmul: the rows stay first only where the operands' shapes keep them there", () => {
    const arg = (rows: boolean, ...shape: Array<number>): Stacking.Arg => ({ rows, shape })
    const mm = (a: Stacking.Arg, b: Stacking.Arg) => Stacking.rules.MatMul([a, b], {})
    // rows on the matrix rows of the left operand
    expect(mm(arg(true, 2, 5), arg(false, 5, 3))).toBe(true) // [c, k] @ [k, m] -> [c, m]
    expect(mm(arg(true, 2, 5), arg(false, 5))).toBe(true) // [c, k] @ [k] -> [c]
    expect(mm(arg(true, 2, 4, 5), arg(false, 5, 3))).toBe(true) // [c, s, k] @ [k, m]
    expect(mm(arg(true, 2, 4, 5), arg(false, 1, 5, 3))).toBe(true) // a size-1 stacking axis broadcasts
    // another operand's stacking axes lead, or stretch the rows' axis
    expect(mm(arg(true, 2, 5), arg(false, 7, 5, 3))).toBe(false) // [c, k] @ [p, k, m] -> [p, c, m]
    expect(mm(arg(true, 2, 4, 5), arg(false, 2, 5, 3))).toBe(false) // one job's count written in
    expect(mm(arg(true, 5), arg(false, 5, 3))).toBe(false) // [c] @ [c, m] contracts the rows
    // rows on the right operand: only on a stacking axis
    expect(mm(arg(false, 4, 5), arg(true, 2, 5, 3))).toBe(true) // [s, k] @ [c, k, m] -> [c, s, m]
    expect(mm(arg(false, 5), arg(true, 2, 5, 3))).toBe(true) // [k] @ [c, k, m] -> [c, m]
    expect(mm(arg(false, 4, 5), arg(true, 2, 5))).toBe(false) // [s, c] @ [c, m] contracts them
    expect(mm(arg(false, 1, 7, 4, 5), arg(true, 2, 5, 3))).toBe(false) // [1, q, s, k] @ [c, k, m] -> [1, q|c, s, m]
    // both: the same rank, a stacking axis
    expect(mm(arg(true, 2, 4, 5), arg(true, 2, 5, 4))).toBe(true)
    expect(mm(arg(true, 2, 5), arg(true, 2, 5))).toBe(false) // [c, k] @ [c, m]: contracted
    expect(mm(arg(true, 2, 3, 4, 5), arg(true, 2, 5, 4))).toBe(false)
  })
  it("broadcasting: the rows' operand has the result's rank, the others stretch over rows", () => {
    const arg = (rows: boolean, ...shape: Array<number>): Stacking.Arg => ({ rows, shape })
    expect(Stacking.rules.Add([arg(true, 2, 3), arg(false, 3)], {})).toBe(true)
    expect(Stacking.rules.Add([arg(true, 2, 3), arg(false, 1, 3)], {})).toBe(true)
    expect(Stacking.rules.Add([arg(true, 2, 3), arg(false, 2, 3)], {})).toBe(false)
    expect(Stacking.rules.Add([arg(true, 3), arg(false, 2, 3)], {})).toBe(false)
    expect(Stacking.rules.Where([arg(false, 3), arg(true, 2, 3), arg(true, 2, 3)], {})).toBe(true)
  })
  it("the values that hold rows are the reads and what is computed from them", () => {
    const { graph } = lm.record(prompt(1), (m) => ({ a: h(m).mul(Tensor.from([2])), w: m.lm_head.weight.mul(3) }))
    const { feeds, rows } = lm.batch([prompt(1)])
    const { values, hooks } = Scan.run(lm.runtime.loaded, { graph, inputs: feeds, rows })
    const got = Stacking.rowwise(graph, values, hooks)!
    const byTag = (tag: string) => graph.nodes.filter((n) => n._tag === tag || (n._tag === "Op" && n.op === tag)).map((n) => n.id)
    expect(byTag("Hook").every((id) => got.has(id))).toBe(true)
    expect(byTag("Param").some((id) => got.has(id))).toBe(false)
    const [withRows, withoutRows] = graph.nodes.filter((n) => n._tag === "Op" && n.op === "Mul").map((n) => n.id)
    expect(got.has(withRows)).toBe(true)
    expect(got.has(withoutRows)).toBe(false)
  })
})

// ---------------------------------------------------------------------------
// the property
// ---------------------------------------------------------------------------

type Step = { readonly name: string; readonly apply: (x: Tracer.TensorProxy) => Tracer.TensorProxy }

// steps that keep rows apart and steps that do not, on tensors of rank 3 (or less, after some)
const steps: ReadonlyArray<Step> = [
  { name: "mul(2)", apply: (x) => x.mul(2) },
  { name: "add(-1)", apply: (x) => x.add(-1) },
  { name: "softmax(-1)", apply: (x) => x.softmax(-1) },
  { name: "softmax(0)", apply: (x) => x.softmax(0) },
  { name: "mean(-1, true)", apply: (x) => x.mean(-1, true) },
  { name: "mean(0)", apply: (x) => x.mean(0) },
  { name: "mean()", apply: (x) => x.mean() },
  { name: "at(':', -1)", apply: (x) => x.at(":", -1) },
  { name: "at(0)", apply: (x) => x.mul(1).at(0) },
  { name: "at('::-1')", apply: (x) => x.at("::-1") },
  { name: "at('...', 0)", apply: (x) => x.at("...", 0) },
  { name: "transpose(0, -1)", apply: (x) => x.transpose(0, -1) },
  { name: "transpose(-2, -1)", apply: (x) => x.transpose(-2, -1) },
  { name: "reshape(-1)", apply: (x) => x.reshape(-1) },
  { name: "reshape(-1, 2, 32)", apply: (x) => x.at(":", 0).reshape(-1, 2, 32) },
  { name: "unsqueeze(1)", apply: (x) => x.unsqueeze(1) },
  { name: "unsqueeze(0)", apply: (x) => x.unsqueeze(0) },
  { name: "squeeze()", apply: (x) => x.squeeze() },
  { name: "tanh()", apply: (x) => x.tanh() },
  { name: "argmax(-1)", apply: (x) => x.argmax(-1).to("float32") },
  { name: "topk(2).values", apply: (x) => x.topk(2, -1).values },
  { name: "where(x > 0, x, 0)", apply: (x) => x.where(x.gt(0), 0) },
  { name: "matmul(self^T)", apply: (x) => x.matmul(x.transpose(-2, -1)) },
  { name: "matmul(x^T, x)", apply: (x) => x.transpose(0, -1).matmul(x) },
  { name: "cat(self, -1)", apply: (x) => x.cat([x], -1) },
  { name: "cat(self, 0)", apply: (x) => x.cat([x], 0) }
]

const experimentOf = (tree: LanguageModel["tree"]) =>
  fc.record({
    reads: fc.array(
      fc.tuple(Arb.modulePath(tree, (m) => m.path.startsWith("model.layers") || m.path === "lm_head"), fc.array(fc.nat(steps.length - 1), { maxLength: 3 })),
      { minLength: 1, maxLength: 2 }
    ),
    set: fc.option(fc.tuple(fc.constantFrom("model.layers.0", "model.layers.2.mlp"), fc.constantFrom(0, 1, 2, 3, 4)))
  })

describe("a co-batched group gives each job what it gets alone", () => {
  it("random graphs, stacked or not, over random prompts, one or two rows a job", async () => {
    const hosted = Server.host("stories260K", serverLm)
    await fc.assert(
      fc.asyncProperty(
        experimentOf(lm.tree),
        fc.array(fc.tuple(fc.nat(1000), fc.boolean()), { minLength: 2, maxLength: 4 }),
        async ({ reads, set }, jobs) => {
          const fn = (m: Envoy) => {
            if (set !== null) {
              const [path, how] = set
              const e = Arb.envoyAt(m, path)
              if (how === 0) e.output.set(0)
              else if (how === 1) e.output.update((x) => x.mul(-1))
              else if (how === 2) e.output.update((x) => x.add(x.mean(0, true)))
              else if (how === 3) e.output.setAt([":", -1], 0)
              else e.output.setAt([0], 0)
            }
            return Object.fromEntries(reads.map(([path, ks], i) => [`r${i}`, ks.reduce<Tracer.TensorProxy>((x, k) => steps[k].apply(x), Arb.envoyAt(m, path).output)]))
          }
          const { graph } = lm.record(prompt(0), fn)
          const specs = jobs.map(([seed, two]): Server.JobSpec => {
            const b = lm.batch(two ? [prompt(seed), prompt(seed + 1)] : [prompt(seed)])
            return {
              owner: "t",
              limits: Server.defaultLimits,
              model: "stories260K",
              kind: "trace",
              graph,
              feeds: b.feeds,
              rows: [{ start: 0, count: two ? 2 : 1 }],
              generate: undefined,
              coBatchKey: "same"
            }
          })
          const outcomes = await Effect.runPromise(Server.runGroup(hosted, specs, { event: () => {} }))
          for (let k = 0; k < specs.length; k++) {
            const alone = await Effect.runPromiseExit(Backend.local.execute({ runtime: lm.runtime, graph, feeds: { ...specs[k].feeds }, rows: specs[k].rows }))
            const got = outcomes[k]
            if (Exit.isFailure(alone)) {
              expect(got._tag, `job ${k}`).toBe("Failed")
              continue
            }
            if (got._tag === "Failed") expect.fail(`job ${k} failed co-batched but not alone: ${got.error.message}`)
            const values = new Map(got.result.values.map((v) => [v.id, v.value]))
            expect([...values.keys()].sort()).toEqual([...alone.value.values.keys()].sort())
            for (const [id, v] of alone.value.values) {
              const t = values.get(id) as Tensor
              expect(t.shape, `job ${k} %${id}`).toEqual((v as Tensor).shape)
              expect(t.allClose(v as Tensor, 1e-5, 1e-5), `job ${k} %${id}`).toBe(true)
            }
          }
        }
      ),
      { numRuns: 60 }
    )
  }, 180_000)
})
