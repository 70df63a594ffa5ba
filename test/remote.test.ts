/**
 * Remote execution end to end, on loopback: a server (`Server.start`)
 * hosting tiny_mlp and stories260K, and the client (`Remote.backend`,
 * `Remote.generate`, `Remote.submit`).
 * (1) traces give the same values remotely as locally: fixed cases, and a
 *     property over random intervention graphs (`testing.experiment`) and
 *     prompts, with one or two invokes; errors raised inside a run come
 *     back as the same typed error with the user's line;
 * (2) generation with per-step interventions gives the same tokens and
 *     values, and streams the same tokens to `onToken`; sessions (traces,
 *     loops, conditions) give the same values;
 * (3) the non-blocking form: a job handle with status, events and result,
 *     re-attachable by id, invisible to other keys;
 * (4) graphs with local functions are refused before sending;
 * (5) bad input: unknown model, bad or missing key, malformed container or
 *     JSON, excess fields, an unknown op, a dangling node reference, a
 *     module that does not exist, an oversize body, over-limit saves,
 *     intermediate values, graph size, tokens and concurrency: each a typed
 *     4xx, and the server keeps serving;
 * (6) co-batching: concurrent jobs of the same shapes share forward passes
 *     and each gets the values it gets alone.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fc } from "@fast-check/vitest"
import { Cause, Effect, Exit, Schema } from "effect"
import { Backend, type Envoy, Errors, Graph, LanguageModel, NNsight, Tensor } from "../src/index.js"
import * as Generate from "../src/backends/Generate.js"
import type * as Local from "../src/backends/Local.js"
import * as Tracer from "../src/core/Tracer.js"
import * as Remote from "../src/remote/Client.js"
import * as Protocol from "../src/remote/Protocol.js"
import * as Server from "../src/remote/Server.js"
import * as Arb from "../src/testing.js"

const ALICE = "alice-secret-key"
const BOB = "bob-secret-key"
const CAROL = "carol-secret-key"

let net: NNsight
let lm: LanguageModel
let serverNet: NNsight
let serverLm: LanguageModel
let server: Server.Running
let batching: Server.Running
let remote: Backend["Service"]

beforeAll(async () => {
  net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
  lm = await LanguageModel.load("models/stories260K")
  // the server has its own copies, as a real one would
  serverNet = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
  serverLm = await LanguageModel.load("models/stories260K")
  const models = [
    { key: "tiny_mlp", model: serverNet },
    { key: "stories260K", model: serverLm }
  ]
  server = await Server.start({
    models,
    keys: [
      { id: "alice", key: ALICE },
      { id: "bob", hash: await Server.hashKey(BOB), limits: { savedBytes: 2048, graphNodes: 40, tokens: 64, valueBytes: 1_000_000 } },
      { id: "carol", hash: await Server.hashKey(CAROL, "sha256"), limits: { concurrentJobs: 0 } }
    ],
    port: 0,
    maxBodyBytes: 1024 * 1024,
    coBatch: false
  })
  batching = await Server.start({ models, keys: [{ id: "alice", key: ALICE }], port: 0, coBatch: true })
  remote = Remote.backend({ url: server.url, apiKey: ALICE })
}, 60_000)

afterAll(async () => {
  await server?.close()
  await batching?.close()
  for (const m of [net, lm, serverNet, serverLm]) await m?.close()
})

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

type Outcome = Local.Outcome

const run = (backend: Backend["Service"], model: { runtime: Local.Runtime }, graph: Graph.Graph, batch: { feeds: Record<string, Tensor>; rows: ReadonlyArray<Local.Rows> }) =>
  Effect.runPromiseExit(backend.execute({ runtime: model.runtime, graph, feeds: batch.feeds, rows: batch.rows }))

const expectSameValue = (a: unknown, b: unknown, what: string): void => {
  if (a instanceof Tensor) {
    expect(b, what).toBeInstanceOf(Tensor)
    const t = b as Tensor
    expect(t.dtype, what).toBe(a.dtype)
    expect(t.shape, what).toEqual(a.shape)
    if (!t.equals(a)) expect(t.toNumbers(), what).toEqual(a.toNumbers())
  } else if (Array.isArray(a)) {
    expect(Array.isArray(b), what).toBe(true)
    a.forEach((x, i) => expectSameValue(x, (b as Array<unknown>)[i], `${what}[${i}]`))
  } else expect(b, what).toEqual(a)
}

const expectSameOutcome = (local: Exit.Exit<Outcome, unknown>, remoteExit: Exit.Exit<Outcome, unknown>, what: string): void => {
  if (Exit.isFailure(local)) {
    expect(Exit.isFailure(remoteExit), `${what}: local failed, remote succeeded`).toBe(true)
    const l = Cause.squash(local.cause) as Errors.TraceError
    const r = Cause.squash((remoteExit as Exit.Failure<Outcome, unknown>).cause) as Errors.TraceError
    expect(r.constructor, what).toBe(l.constructor)
    expect(r._tag, what).toBe(l._tag)
    expect(r.message, what).toBe(l.message)
    expect((r as { site: string }).site, what).toBe((l as { site: string }).site)
    return
  }
  if (Exit.isFailure(remoteExit)) expect.fail(`${what}: remote failed: ${Cause.pretty(remoteExit.cause)}`)
  const lo = local.value
  const ro = remoteExit.value
  expect([...ro.values.keys()].sort(), what).toEqual([...lo.values.keys()].sort())
  for (const [id, v] of lo.values) expectSameValue(v, ro.values.get(id), `${what}: %${id}`)
  expect([...ro.unavailable.keys()].sort(), what).toEqual([...lo.unavailable.keys()].sort())
  for (const [id, e] of lo.unavailable) {
    const r = ro.unavailable.get(id)!
    expect(r).toBeInstanceOf(Errors.Unavailable)
    expect(r.message).toBe(e.message)
  }
}

/** Records `fn` with one invoke per prompt. */
const recordInvokes = (prompts: ReadonlyArray<unknown>, fn: (m: Envoy, k: number) => unknown) =>
  Tracer.record<unknown, unknown>(lm.tree.root, (m, t) => prompts.map((p, k) => t.invoke(p, () => fn(m, k))), { hasInput: false })

/** Records a generation as `LanguageModel.generate` does (`m.generator.output` included). */
const recordGenerate = <R>(prompt: unknown, steps: number, fn: (m: Envoy & { generator: { output: Tracer.TensorProxy } }, t: Tracer.Context<unknown>) => R) =>
  Tracer.record<unknown, R>(lm.tree.root, fn as never, {
    input: prompt,
    hasInput: true,
    steps,
    extend: Tracer.generatorEnvoy
  })

const post = (url: string, body: Uint8Array, key: string | null = ALICE, headers: Record<string, string> = {}) =>
  fetch(`${url}/v1/jobs`, {
    method: "POST",
    body,
    headers: { "content-type": "application/octet-stream", ...(key === null ? {} : { authorization: `Bearer ${key}` }), ...headers }
  })

const container = (request: unknown, feeds: Record<string, Tensor> = {}) => Protocol.encodeTensors(feeds, { request: JSON.stringify(request) })

const mlpRequest = (graph: Graph.Graph, extra: Record<string, unknown> = {}) => ({
  model: "tiny_mlp",
  kind: "trace",
  graph: Graph.encode(graph),
  inputs: { _tag: "Feeds", rows: [{ start: 0, count: 1 }] },
  ...extra
})

const x = Tensor.from([[1, 2, 3, 4, 5]])
const prompt = "Once upon a time, there was a little girl named"

// ---------------------------------------------------------------------------
// (1) traces
// ---------------------------------------------------------------------------

describe("traces: remote equals local", () => {
  it("tiny_mlp: reads, ops and a set", async () => {
    const fn = (m: Envoy) => {
      m.layer1.output.set(m.layer1.output.mul(2).add(1))
      return { h: m.layer1.output, y: m.output, s: m.layer2.input.softmax(-1) }
    }
    const local = await net.trace(x, fn)
    const got = await net.trace(x, fn, { backend: remote })
    for (const k of ["h", "y", "s"] as const) expectSameValue(local[k], got[k], k)
  })

  it("stories260K: activation patching across two invokes, module calls (logit lens)", async () => {
    const fn = (m: Envoy, t: Tracer.Context<unknown>) => {
      const src = t.invoke("Once upon a time, there was a little boy named", () => m.model.layers[2].output.at(":", -1))
      return t.invoke(prompt, () => {
        m.model.layers[2].output.setAt([":", -1], src)
        return { logits: m.lm_head.output, lens: m.lm_head.call(m.model.norm.call(m.model.layers[1].output)) }
      })
    }
    const local = await lm.trace(fn)
    const got = await lm.trace(fn, { backend: remote })
    expectSameValue(local.logits, got.logits, "logits")
    expectSameValue(local.lens, got.lens, "lens")
  })

  it("values that are not tensors, early stop and unavailable values come back the same", async () => {
    const fn = (m: Envoy, t: Tracer.Context<unknown>) => {
      const h = m.model.layers[0].output
      const n = h.shape
      t.stop()
      return { h, n, late: m.lm_head.output }
    }
    const local = await lm.trace(prompt, fn)
    const got = await lm.trace(prompt, fn, { backend: remote })
    expectSameValue(local.h, got.h, "h")
    expect(got.n).toEqual(local.n)
    let le: unknown
    let re: unknown
    try {
      void local.late
    } catch (e) {
      le = e
    }
    try {
      void got.late
    } catch (e) {
      re = e
    }
    expect(re).toBeInstanceOf(Errors.Unavailable)
    expect((re as Error).message).toBe((le as Error).message)
  })

  it("random experiments (testing.experiment) over random prompts and invokes give the same outcome", async () => {
    await fc.assert(
      fc.asyncProperty(
        Arb.experiment(lm.tree, { withSets: true }),
        fc.array(Arb.prompt({ maxWords: 6 }), { minLength: 1, maxLength: 2 }),
        async (e, prompts) => {
          const { graph } = recordInvokes(prompts, (m) => e.fn(m))
          const batch = lm.batch(prompts)
          const local = await run(Backend.local, lm, graph, batch)
          const got = await run(remote, lm, graph, batch)
          expectSameOutcome(local, got, e.description)
        }
      ),
      { numRuns: 15 }
    )
  })

  it("an error raised inside the run comes back typed, with the user's line", async () => {
    // recorded without the client-side scan, so the error is raised by the server's run
    const { graph } = lm.record(prompt, (m) => {
      m.model.layers[1].mlp.output.set(Tensor.zeros([3, 5]))
      return m.lm_head.output
    })
    const batch = lm.batch([prompt])
    const local = await run(Backend.local, lm, graph, batch)
    const got = await run(remote, lm, graph, batch)
    expect(Exit.isFailure(local)).toBe(true)
    expectSameOutcome(local, got, "bad set")
    const error = Cause.squash((got as Exit.Failure<Outcome, unknown>).cause)
    expect(error).toBeInstanceOf(Errors.InvalidValue)
    expect((error as Errors.InvalidValue).site).toMatch(/remote\.test\.ts:\d+:\d+/)
  })

  it("an edited model (edits address every invoke) runs remotely as locally", async () => {
    const edited = lm.edit((m) => {
      m.model.layers[0].mlp.output.set(0)
    })
    const fn = (m: Envoy, t: Tracer.Context<unknown>) => {
      const a = t.invoke("Once upon a time", () => m.lm_head.output)
      const b = t.invoke("There was a dog", () => m.model.layers[2].output)
      return { a, b }
    }
    const local = await edited.trace(fn)
    const got = await edited.trace(fn, { backend: remote })
    expectSameValue(local.a, got.a, "a")
    expectSameValue(local.b, got.b, "b")
    const plain = await lm.trace(fn)
    expect(plain.a.equals(got.a)).toBe(false)
    const onBatching = await edited.trace(fn, { backend: Remote.backend({ url: batching.url, apiKey: ALICE }) })
    expectSameValue(local.a, onBatching.a, "a (co-batching server)")
  })

  it("log() lines are printed by the client", async () => {
    const lines: Array<string> = []
    const backend = Remote.backend({ url: server.url, apiKey: ALICE, onLog: (l) => lines.push(l) })
    await lm.trace(prompt, (m, t) => {
      t.log("mean of layer 0:", m.model.layers[0].output.mean())
      return m.lm_head.output
    }, { backend })
    expect(lines.length).toBe(1)
    expect(lines[0]).toMatch(/^mean of layer 0: tensor\(/)
  })

  it("a run that follows its events (progress) gives what the one-round-trip run gives, log lines included", async () => {
    const fn = (m: Envoy, t: Tracer.Context<unknown>) => {
      t.log("last logit:", m.lm_head.output.at(0, -1, 0))
      return { h: m.model.layers[1].output.at(":", -1) }
    }
    const quiet: Array<string> = []
    const followed: Array<string> = []
    const progress: Array<string> = []
    const oneTrip = await lm.trace(prompt, fn, { backend: Remote.backend({ url: server.url, apiKey: ALICE, onLog: (l) => quiet.push(l) }) })
    const streamed = await lm.trace(prompt, fn, {
      backend: Remote.backend({ url: server.url, apiKey: ALICE, onLog: (l) => followed.push(l), progress: (l) => progress.push(l) })
    })
    expect(oneTrip.h.equals(streamed.h)).toBe(true)
    expect(quiet).toEqual(followed)
    expect(quiet.length).toBe(1)
    // only the followed run reports progress
    expect(progress.some((l) => l.includes("completed"))).toBe(true)
  })
})

// ---------------------------------------------------------------------------
// (2) generation
// ---------------------------------------------------------------------------

describe("generation: remote equals local", () => {
  const options = { maxNewTokens: 4, eosTokenId: [] as Array<number> }
  const cases: ReadonlyArray<readonly [string, (m: Envoy & { generator: { output: Tracer.TensorProxy } }, t: Tracer.Context<unknown>) => unknown]> = [
    ["tokens", (m) => m.generator.output],
    [
      "steering every step (t.all), per-step hidden states",
      (m, t) => {
        t.all()
        m.model.layers[2].output.update((h) => h.mul(1.5))
        return { tokens: m.generator.output, hidden: m.model.layers[4].output.at(":", -1) }
      }
    ],
    [
      "zero-ablating an MLP on steps 1..2 (iter), logits per step",
      (m, t) => {
        const logits = t.iter([1, 2], () => {
          m.model.layers[0].mlp.output.set(0)
          return m.lm_head.output.at(":", -1)
        })
        return { tokens: m.generator.output, logits }
      }
    ]
  ]
  for (const [name, fn] of cases) {
    it(name, async () => {
      const { graph } = recordGenerate(prompt, options.maxNewTokens, fn)
      const batch = lm.batch([prompt])
      const req = { graph, feeds: batch.feeds, rows: batch.rows }
      const localTokens: Array<ReadonlyArray<number>> = []
      const remoteTokens: Array<ReadonlyArray<number>> = []
      const local = await Effect.runPromise(Generate.run(lm.runtime, req, { ...options, onToken: (e) => localTokens.push(e.tokens) }))
      const got = await Effect.runPromise(
        Remote.generate({ url: server.url, apiKey: ALICE })(lm.runtime, req, { ...options, onToken: (e) => remoteTokens.push(e.tokens) })
      )
      expectSameValue(local.tokens, got.tokens, "tokens")
      expectSameOutcome(Exit.succeed(local.outcome), Exit.succeed(got.outcome), name)
      expect(remoteTokens).toEqual(localTokens)
    })
  }

  it("an error raised at a later step comes back typed, with the user's line", async () => {
    const { graph } = recordGenerate(prompt, 3, (m, t) => {
      t.next()
      m.model.layers[1].output.set(Tensor.zeros([2, 2]))
      return m.generator.output
    })
    const batch = lm.batch([prompt])
    const req = { graph, feeds: batch.feeds, rows: batch.rows }
    const local = await Effect.runPromiseExit(Effect.map(Generate.run(lm.runtime, req, { maxNewTokens: 3 }), (r) => r.outcome))
    const got = await Effect.runPromiseExit(Effect.map(Remote.generate({ url: server.url, apiKey: ALICE })(lm.runtime, req, { maxNewTokens: 3 }), (r) => r.outcome))
    expect(Exit.isFailure(local)).toBe(true)
    expectSameOutcome(local, got, "bad set at step 1")
  })
})

/** Runs a session remotely; gives its returned values by field name. */
const remoteSession = async (fn: (s: Tracer.SessionContext<unknown>) => unknown) => {
  const { graph } = lm.recordSession(fn)
  const got = await Effect.runPromiseExit(Remote.session({ url: server.url, apiKey: ALICE })(lm.runtime, graph))
  if (Exit.isFailure(got)) expect.fail(Cause.pretty(got.cause))
  const fields = (graph.result as Extract<Graph.Result, { _tag: "Record" }>).fields
  return (k: string) => got.value.values.get((fields[k] as Extract<Graph.Result, { _tag: "Ref" }>).id)
}

describe("sessions: remote equals local", () => {
  it("two traces, a loop and a condition over graph values", async () => {
    const fn = (s: Tracer.SessionContext<unknown>) => {
      const clean = s.trace("Once upon a time, there was a little boy named", (m) => m.model.layers[1].output.at(":", -1))
      const acc = s.list()
      s.iter([0, 1, 2, 3], (i) => s.cond(i.mod(2).eq(0), () => acc.append(i)))
      const logits = s.trace(prompt, (m) => {
        m.model.layers[1].output.setAt([":", -1], clean)
        return m.lm_head.output
      })
      return { logits, acc }
    }
    const local = await lm.session(fn)
    const remote = await remoteSession(fn)
    expectSameValue(local.logits, remote("logits"), "logits")
    expect((remote("acc") as { items: ReadonlyArray<unknown> }).items).toEqual(local.acc)
  })

  it("training: variables, their gradients and SGD steps in the graph", async () => {
    const fn = (s: Tracer.SessionContext<unknown>) => {
      const steer = s.variable(Tensor.zeros([64]))
      const losses = s.list()
      s.iter([prompt, "One day, a little"], (p) =>
        s.trace(p, (m) => {
          m.model.layers[2].output.update((h) => h.add(steer))
          const g = steer.grad
          const loss = m.lm_head.output.at(0, -1).logSoftmax().at(317).neg()
          loss.backward()
          losses.append(loss)
          steer.update((v) => v.sub(g.mul(0.5)))
        })
      )
      return { steer, losses }
    }
    const local = await lm.session(fn)
    const remote = await remoteSession(fn)
    expectSameValue(local.steer, remote("steer"), "steer")
    expect(local.steer.toNumbers().some((v) => v !== 0)).toBe(true)
    const losses = (remote("losses") as { items: ReadonlyArray<Tensor> }).items
    expect(losses.length).toBe(2)
    losses.forEach((l, k) => expectSameValue(local.losses[k] as Tensor, l, `loss ${k}`))
  })
})

// ---------------------------------------------------------------------------
// (3) job handles
// ---------------------------------------------------------------------------

describe("non-blocking jobs", () => {
  it("submit gives a handle: status, events, result; another key cannot see it", async () => {
    const { graph } = lm.record(prompt, (m) => ({ h: m.model.layers[3].output, logits: m.lm_head.output }))
    const options = { url: server.url, apiKey: ALICE }
    const job = await Remote.submit(options, { kind: "trace", runtime: lm.runtime, graph, prompts: [prompt] })
    expect(job.model).toBe("stories260K")
    expect(["queued", "running", "completed"]).toContain((await job.status()).state)
    const outcome = await job.result()
    expect((await job.status()).state).toBe("completed")
    const events: Array<string> = []
    for await (const e of job.events()) events.push(e._tag)
    expect(events[0]).toBe("Received")
    expect(events).toContain("Running")
    expect(events[events.length - 1]).toBe("Completed")
    // prompts tokenized on the server give what local tokenization gives
    const local = await run(Backend.local, lm, graph, lm.batch([prompt]))
    expectSameOutcome(local, Exit.succeed(outcome), "prompts")
    // re-attach by id; another key gets 404
    expect((await Remote.job(options, job.id).status()).state).toBe("completed")
    await expect(Remote.job({ url: server.url, apiKey: BOB }, job.id).status()).rejects.toBeInstanceOf(Protocol.JobNotFound)
    const raw = await fetch(`${server.url}/v1/jobs/${job.id}/result`, { headers: { authorization: `Bearer ${BOB}` } })
    expect(raw.status).toBe(404)
  })
})

describe("cancellation", () => {
  it("a queued job can be cancelled; its result is the cancellation", async () => {
    const options = { url: server.url, apiKey: ALICE }
    const { graph } = lm.record(prompt, (m) => m.lm_head.output)
    const jobs = await Promise.all(
      Array.from({ length: 6 }, () => Remote.submit(options, { kind: "trace", runtime: lm.runtime, graph, prompts: [prompt] }))
    )
    const last = jobs[jobs.length - 1]
    const status = await last.cancel()
    expect(["cancelled", "completed"]).toContain(status.state)
    if (status.state === "cancelled") await expect(last.result()).rejects.toBeInstanceOf(Protocol.JobCancelled)
    for (const j of jobs.slice(0, -1)) await j.result()
  })

  it("a one-round-trip run whose caller hangs up while it is queued is cancelled, not run", async () => {
    const options = { url: server.url, apiKey: ALICE }
    const { graph } = lm.record(prompt, (m) => m.lm_head.output)
    const slow = graph
    const before = await server.stats()
    // a backlog that keeps the run queued
    const backlog = await Promise.all(
      Array.from({ length: 8 }, () =>
        Remote.submit(options, { kind: "generate", runtime: lm.runtime, graph: slow, prompts: [prompt], generate: { maxNewTokens: 40 } }))
    )
    const body = await Effect.runPromise(
      Schema.encodeEffect(Protocol.SubmissionBody)({
        request: { model: "stories260K", kind: "trace", graph, inputs: { _tag: "Prompts", prompts: [prompt] } },
        feeds: {}
      })
    )
    const hangUp = new AbortController()
    const run = fetch(`${server.url}/v1/jobs/run`, {
      method: "POST",
      headers: { authorization: `Bearer ${ALICE}`, "content-type": "application/octet-stream" },
      body,
      signal: hangUp.signal
    })
    // the job is queued behind the backlog before the caller goes
    for (let k = 0; k < 100 && (await server.stats()).submitted < before.submitted + backlog.length + 1; k++) await new Promise((r) => setTimeout(r, 5))
    hangUp.abort()
    await expect(run).rejects.toThrow()
    for (const j of backlog) await j.result()
    for (let k = 0; k < 100 && (await server.stats()).queued > 0; k++) await new Promise((r) => setTimeout(r, 5))
    const after = await server.stats()
    expect(after.submitted - before.submitted).toBe(backlog.length + 1)
    expect(after.completed - before.completed).toBe(backlog.length)
    expect(after.failed - before.failed).toBe(1)
    expect(after.runs - before.runs).toBe(backlog.length)
  })
})


// ---------------------------------------------------------------------------
// (4) local functions
// ---------------------------------------------------------------------------

describe("graphs with local functions are refused before sending", () => {
  it("apply(fn) and returned functions", async () => {
    const before = (await server.stats()).submitted
    const refused = lm.trace(prompt, (m, t) => t.apply((h: Tensor) => h, m.model.layers[0].output), { backend: remote })
    await expect(refused).rejects.toBeInstanceOf(Errors.InvalidValue)
    await expect(refused).rejects.toThrow(/local TypeScript function.*only graph operations cross the wire/)
    const returned = lm.trace(prompt, (m) => ({ h: m.model.layers[0].output, f: () => 1 }), { backend: remote })
    await expect(returned).rejects.toThrow(/local TypeScript function/)
    expect((await server.stats()).submitted).toBe(before)
  })
})

// ---------------------------------------------------------------------------
// (5) bad input
// ---------------------------------------------------------------------------

describe("bad input: typed 4xx, and the server keeps serving", () => {
  const mlpGraph = () => net.record(x, (m) => ({ h: m.layer1.output })).graph

  const expectTyped = async (response: Response, status: number, tag: string) => {
    expect(response.status).toBe(status)
    const body = (await response.json()) as { _tag: string }
    expect(body._tag).toBe(tag)
    return body as Record<string, unknown>
  }

  it("each bad request gets its typed error", async () => {
    const g = mlpGraph()
    const good = mlpRequest(g)
    const before = (await server.stats()).rejected

    await expectTyped(await post(server.url, container({ ...good, model: "nope" }, { x })), 404, "UnknownModel")
    await expectTyped(await post(server.url, container(good, { x }), "wrong-key"), 401, "Unauthorized")
    await expectTyped(await post(server.url, container(good, { x }), null), 401, "Unauthorized")
    await expectTyped(await post(server.url, Protocol.encodeTensors({ x }, { request: "{ not json" })), 400, "BadRequest")
    await expectTyped(await post(server.url, new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])), 400, "BadRequest")
    await expectTyped(await post(server.url, container({ ...good, extra: true }, { x })), 400, "BadRequest")
    await expectTyped(await post(server.url, container({ ...good, inputs: { _tag: "Feeds", rows: [] } }, { x })), 400, "BadRequest")
    await expectTyped(await post(server.url, container(good, { x }), ALICE, { "content-type": "application/json" }), 400, "BadRequest")

    // an operation the protocol does not know
    const unknownOp = Graph.encode(net.record(x, (m) => m.layer1.output.mul(2)).graph) as { nodes: Array<Record<string, unknown>> }
    const withOp = { ...unknownOp, nodes: unknownOp.nodes.map((n) => (n._tag === "Op" ? { ...n, op: "Frobnicate" } : n)) }
    const opError = await expectTyped(await post(server.url, container({ ...good, graph: withOp }, { x })), 400, "BadRequest")
    expect(JSON.stringify(opError)).toMatch(/Frobnicate|op/)

    // a node referring to a node that does not exist
    const dangling = { ...unknownOp, nodes: unknownOp.nodes.map((n) => (n._tag === "Op" ? { ...n, args: [99] } : n)) }
    await expectTyped(await post(server.url, container({ ...good, graph: dangling }, { x })), 400, "BadRequest")

    // a module the model does not have: the trace error a local run raises, as a 422
    const encoded = Graph.encode(g) as { nodes: Array<Record<string, unknown>> }
    const noModule = {
      ...encoded,
      nodes: encoded.nodes.map((n) => (n._tag === "Hook" ? { ...n, ref: { ...(n.ref as object), module: "layer9" } } : n))
    }
    const rejected = await expectTyped(await post(server.url, container({ ...good, graph: noModule }, { x })), 422, "GraphRejected")
    expect((rejected.error as { _tag: string })._tag).toBe("UnknownModule")

    // an oversize body (the limit is 1 MiB)
    const big = Tensor.zeros([1, 300_000])
    await expectTyped(await post(server.url, container(good, { x: big })), 413, "PayloadTooLarge")

    // bob's limits: saved bytes, graph nodes, tokens
    const logits = lm.record(prompt, (m) => m.lm_head.output).graph
    // admission remembers what it learned of a graph (alice's request), yet applies each key's limits
    const logitsRequest = { model: "stories260K", kind: "trace", graph: Graph.encode(logits), inputs: { _tag: "Prompts", prompts: [prompt] } }
    expect((await post(server.url, container(logitsRequest))).status).toBe(202)
    const saved = await expectTyped(
      await post(server.url, container({ model: "stories260K", kind: "trace", graph: Graph.encode(logits), inputs: { _tag: "Prompts", prompts: [prompt] } }), BOB),
      422,
      "LimitExceeded"
    )
    expect(saved.limit).toBe("savedBytes")
    const long = net.record(x, (m) => {
      let h: Tracer.TensorProxy = m.layer1.output
      for (let k = 0; k < 50; k++) h = h.add(1)
      return h
    }).graph
    const nodes = await expectTyped(await post(server.url, container(mlpRequest(long), { x }), BOB), 422, "LimitExceeded")
    expect(nodes.limit).toBe("graphNodes")
    const small = lm.record(prompt, (m) => m.model.layers[0].output.at(0, 0, 0)).graph
    const tokens = await expectTyped(
      await post(server.url, container({ model: "stories260K", kind: "trace", graph: Graph.encode(small), inputs: { _tag: "Prompts", prompts: [prompt.repeat(12)] } }), BOB),
      422,
      "LimitExceeded"
    )
    expect(tokens.limit).toBe("tokens")
    const huge = net.record(x, (m) => m.layer1.output.expand(100_000, 10).sum()).graph
    const value = await expectTyped(await post(server.url, container(mlpRequest(huge), { x }), BOB), 422, "LimitExceeded")
    expect(value.limit).toBe("valueBytes")
    // carol may not run any job at once
    await expectTyped(await post(server.url, container(good, { x }), CAROL), 429, "TooManyJobs")
    // unknown job ids
    await expectTyped(await fetch(`${server.url}/v1/jobs/nope`, { headers: { authorization: `Bearer ${ALICE}` } }), 404, "JobNotFound")

    expect((await server.stats()).rejected).toBeGreaterThan(before)
    // still serving
    const local = await net.trace(x, (m) => m.layer1.output)
    expectSameValue(local, await net.trace(x, (m) => m.layer1.output, { backend: remote }), "after bad requests")
  })

  it("the client surfaces wire errors: a bad key, an unknown model", async () => {
    const bad = Remote.backend({ url: server.url, apiKey: "wrong-key" })
    await expect(net.trace(x, (m) => m.layer1.output, { backend: bad })).rejects.toThrow(/remote execution failed: unauthorized/)
    const unknown = Remote.backend({ url: server.url, apiKey: ALICE, model: "nope" })
    await expect(net.trace(x, (m) => m.layer1.output, { backend: unknown })).rejects.toThrow(/hosts no model "nope"/)
    await expect(Remote.submit({ url: server.url, apiKey: "wrong-key", model: "tiny_mlp" }, { kind: "trace", graph: mlpGraph(), feeds: { x }, rows: [{ start: 0, count: 1 }] }))
      .rejects.toBeInstanceOf(Protocol.Unauthorized)
  })
})

// ---------------------------------------------------------------------------
// (6) co-batching
// ---------------------------------------------------------------------------

describe("co-batching", () => {
  it("concurrent jobs of the same shapes share forward passes, each with its own values", async () => {
    const before = await batching.stats()
    const ids = (seed: number) => Array.from({ length: 8 }, (_, k) => 1 + ((seed * 37 + k * 11) % 500))
    const fns: ReadonlyArray<(m: Envoy) => Record<string, Tracer.TensorProxy>> = [
      (m) => ({ l: m.lm_head.output }),
      (m) => {
        m.model.layers[1].output.update((h) => h.mul(-1))
        return { l: m.lm_head.output, h: m.model.layers[3].output }
      },
      (m) => {
        m.model.layers[0].mlp.output.set(0)
        return { a: m.model.layers[2].self_attn.output.softmax(-1) }
      }
    ]
    const jobs = Array.from({ length: 12 }, (_, k) => {
      const p = ids(k)
      const { graph } = lm.record(p, fns[k % fns.length])
      return { graph, batch: lm.batch([p]) }
    })
    const options = { url: batching.url, apiKey: ALICE }
    const outcomes = await Promise.all(
      jobs.map(async (j) => {
        const job = await Remote.submit(options, { kind: "trace", runtime: lm.runtime, graph: j.graph, feeds: j.batch.feeds, rows: j.batch.rows })
        return job.result()
      })
    )
    for (let k = 0; k < jobs.length; k++) {
      const local = await run(Backend.local, lm, jobs[k].graph, jobs[k].batch)
      if (Exit.isFailure(local)) expect.fail(Cause.pretty(local.cause))
      for (const [id, v] of local.value.values) {
        const got = outcomes[k].values.get(id) as Tensor
        expect(got.shape).toEqual((v as Tensor).shape)
        expect(got.allClose(v as Tensor, 1e-5, 1e-5), `job ${k} %${id}`).toBe(true)
      }
    }
    const after = await batching.stats()
    expect(after.coBatchedRuns).toBeGreaterThan(before.coBatchedRuns)
    expect(after.completed - before.completed).toBe(jobs.length)
  })

  it("a merged pass that fails reruns each job alone: the error stays with its job", async () => {
    const hosted = Server.host("stories260K", serverLm)
    const spec = (p: ReadonlyArray<number>, fn: (m: Envoy) => unknown): Server.JobSpec => {
      const b = lm.batch([p])
      return {
        owner: "t",
        limits: Server.defaultLimits,
        model: "stories260K",
        kind: "trace",
        graph: lm.record(p, fn).graph,
        feeds: b.feeds,
        rows: b.rows,
        generate: undefined,
        coBatchKey: "same"
      }
    }
    const good = (m: Envoy) => m.model.layers[1].output.mul(3)
    const specs = [
      spec([5, 6, 7, 8], good),
      spec([9, 10, 11, 12], (m) => {
        m.model.layers[1].output.set(Tensor.zeros([7, 7]))
        return m.model.layers[1].output
      }),
      spec([13, 14, 15, 16], good)
    ]
    const outcomes = await Effect.runPromise(Server.runGroup(hosted, specs, { event: () => {} }))
    expect(outcomes.map((o) => o._tag)).toEqual(["Done", "Failed", "Done"])
    expect((outcomes[1] as { error: unknown }).error).toBeInstanceOf(Errors.InvalidValue)
    for (const k of [0, 2]) {
      const local = await run(Backend.local, lm, specs[k].graph, { feeds: { ...specs[k].feeds }, rows: specs[k].rows })
      const done = outcomes[k] as { result: Protocol.JobResult }
      expectSameOutcome(local, Exit.succeed({ values: new Map(done.result.values.map((v) => [v.id, v.value])), unavailable: new Map() }) as never, `job ${k}`)
    }
  })

  it("a failing job among concurrent ones fails alone", async () => {
    const good = lm.record([5, 6, 7, 8], (m) => m.model.layers[1].output)
    const bad = lm.record([9, 10, 11, 12], (m) => {
      m.model.layers[1].output.set(Tensor.zeros([7, 7]))
      return m.model.layers[1].output
    })
    const options = { url: batching.url, apiKey: ALICE }
    const submit = (r: typeof good, p: ReadonlyArray<number>) => {
      const b = lm.batch([p])
      return Remote.submit(options, { kind: "trace", runtime: lm.runtime, graph: r.graph, feeds: b.feeds, rows: b.rows })
    }
    const submitted = await Promise.all([submit(good, [5, 6, 7, 8]), submit(bad, [9, 10, 11, 12]), submit(good, [5, 6, 7, 8])])
    const results = await Promise.allSettled(submitted.map((j) => j.result()))
    expect(results.map((r) => r.status)).toEqual(["fulfilled", "rejected", "fulfilled"])
    expect((results[1] as PromiseRejectedResult).reason).toBeInstanceOf(Errors.InvalidValue)
  })
})
