/**
 * Load test of remote execution, on loopback, bounded in count and time:
 * 32 concurrent clients x 10 requests each (stories260K, three kinds of
 * intervention graph over eight prompts of the same length), against a
 * server that runs every request on its own forward pass and one that
 * co-batches concurrent requests. Every request must complete with the
 * values a local run gives; the throughput of both is reported.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Cause, Effect, Exit } from "effect"
import { LanguageModel, type Tensor } from "../src/index.js"
import * as Remote from "../src/remote/Client.js"
import * as Server from "../src/remote/Server.js"
import { type Case, loadCases } from "./support/remoteLoad.js"

const KEY = "load-test-key"
const CLIENTS = 32
const REQUESTS = 10

let lm: LanguageModel
let serverLm: LanguageModel
let sequential: Server.Running
let coBatched: Server.Running

let cases: Array<Case> = []

beforeAll(async () => {
  lm = await LanguageModel.load("models/stories260K")
  serverLm = await LanguageModel.load("models/stories260K")
  cases = await loadCases(lm)
  const models = [{ key: "stories260K", model: serverLm }]
  const keys = [{ id: "load", key: KEY }]
  sequential = await Server.start({ models, keys, port: 0, coBatch: false })
  coBatched = await Server.start({ models, keys, port: 0, coBatch: true, coBatchMaxRows: 16 })
}, 60_000)

afterAll(async () => {
  await sequential?.close()
  await coBatched?.close()
  await lm?.close()
  await serverLm?.close()
})

/** 32 clients x 10 requests; checks every result; gives the wall time and counts. */
const load = async (server: Server.Running) => {
  const backend = Remote.backend({ url: server.url, apiKey: KEY })
  // warm up sessions and connections
  await Effect.runPromise(backend.execute({ runtime: lm.runtime, ...cases[0] }))
  let exact = 0
  let checked = 0
  const failures: Array<string> = []
  const t0 = performance.now()
  await Promise.all(
    Array.from({ length: CLIENTS }, async (_, c) => {
      for (let r = 0; r < REQUESTS; r++) {
        const k = (c * REQUESTS + r * 7) % cases.length
        const { graph, feeds, rows, expected } = cases[k]
        const exit = await Effect.runPromiseExit(backend.execute({ runtime: lm.runtime, graph, feeds, rows }))
        if (Exit.isFailure(exit)) {
          failures.push(`client ${c} request ${r}: ${Cause.pretty(exit.cause)}`)
          continue
        }
        for (const [id, want] of expected.values) {
          const got = exit.value.values.get(id) as Tensor | undefined
          checked++
          if (got !== undefined && got.equals(want as Tensor)) exact++
          else if (got === undefined || !got.allClose(want as Tensor, 1e-6, 1e-6)) failures.push(`client ${c} request ${r}: %${id} differs`)
        }
      }
    })
  )
  const seconds = (performance.now() - t0) / 1000
  return { seconds, exact, checked, failures, stats: await server.stats() }
}

describe("load: 32 clients x 10 requests", () => {
  it("every request completes correctly; co-batching raises throughput", async () => {
    const seq = await load(sequential)
    const co = await load(coBatched)
    const n = CLIENTS * REQUESTS
    const row = (name: string, r: typeof seq) =>
      `${name.padEnd(12)} ${String(n).padStart(4)} requests in ${r.seconds.toFixed(2)} s = ${(n / r.seconds).toFixed(1).padStart(6)} req/s; ` +
      `${r.stats.runs} forward passes, ${r.stats.coBatchedRuns} shared (largest ${r.stats.largestBatch} jobs); ` +
      `${r.exact}/${r.checked} values bit-identical to local`
    console.log(
      [
        "remote load test (loopback, stories260K):",
        row("sequential", seq),
        row("co-batched", co),
        `co-batching throughput: ${(seq.seconds / co.seconds).toFixed(2)}x sequential`
      ].join("\n")
    )
    expect(seq.failures).toEqual([])
    expect(co.failures).toEqual([])
    expect(seq.stats.completed).toBe(n + 1)
    expect(co.stats.completed).toBe(n + 1)
    expect(seq.stats.coBatchedRuns).toBe(0)
    expect(co.stats.coBatchedRuns).toBeGreaterThan(0)
    expect(co.stats.runs).toBeLessThan(seq.stats.runs)
  }, 60_000)
})
