/**
 * Remote throughput with and without co-batching: 32 concurrent clients x 10
 * requests each on loopback (stories260K, three kinds of intervention graph
 * over eight prompts of the same length), against a server that runs every
 * request on its own forward pass and one that co-batches concurrent
 * requests. Every result is checked against a local run. The server runs in
 * its own process (`nnsight-ts serve`), as it would for remote users; the
 * clients share this one. What is measured is a server that has been
 * running a while: before timing, every kind of request runs once on each
 * server, then several untimed rounds of the concurrent load. Measured: a
 * fresh server's rounds keep getting faster for about six rounds (a
 * co-batching one's CPU per round fell from 0.7 s to 0.3 s), though it makes
 * no new session after the first round.
 *
 *     npx tsx bench/cobatch.ts      # prints one JSON line
 */
import { readFileSync } from "node:fs"
import { Effect, Exit } from "effect"
import { LanguageModel, type Tensor, defaultModelDir } from "../src/index.js"
import * as Remote from "../src/remote/Client.js"
import { spawnCli } from "../test/support/cli.js"
import { type Case, loadCases } from "../test/support/remoteLoad.js"
import type * as Local from "../src/backends/Local.js"
import { median, round } from "./harness.js"


/** Starts `nnsight-ts serve` in a child process; resolves with its URL once it listens. */
const serve = (coBatch: boolean) =>
  new Promise<{ readonly url: string; readonly stop: () => void; readonly cpu: () => number }>((resolve, reject) => {
    const child = spawnCli(["serve", "--model", `stories260K=${defaultModelDir}`, "--port", "0", `--co-batch=${coBatch}`], {
      NNSIGHT_API_KEYS: `bench:${KEY}`
    })
    let out = ""
    const stop = () => child.kill("SIGINT")
    child.stdout!.on("data", (d) => {
      out += String(d)
      const m = /on (http:\/\/[^\s]+)/.exec(out)
      // the server's CPU seconds so far (Linux), to tell a busy server from a waiting one
      const cpu = () => {
        try {
          const f = readFileSync(`/proc/${child.pid}/stat`, "utf8").split(") ")[1].split(" ")
          return (Number(f[11]) + Number(f[12])) / 100
        } catch {
          return NaN
        }
      }
      if (m) resolve({ url: m[1], stop, cpu })
    })
    child.stderr!.on("data", (d) => (out += String(d)))
    child.on("exit", (code) => reject(new Error(`the server exited (${code}): ${out}`)))
  })

const KEY = "bench-key"

/** One round of the load on a server: its time, CPU, passes, and wrong results. */
interface Round {
  readonly seconds: number
  readonly wrong: number
  readonly runs: number
  readonly largestBatch: number
  readonly serverCpu: number
  readonly clientCpu: number
}

/**
 * The measurement: both servers run at once, warmed up, then timed in
 * alternating rounds (a shared machine's slow stretches hit both alike);
 * the throughput ratio is the median of the rounds' ratios.
 */
export const measure = async (
  options: { readonly clients?: number; readonly requests?: number; readonly rounds?: number; readonly warmRounds?: number } = {}
) => {
  const clients = options.clients ?? 32
  const requests = options.requests ?? 10
  const rounds = options.rounds ?? 5
  const warmRounds = options.warmRounds ?? 6
  const lm = await LanguageModel.load(defaultModelDir)
  const cases = await loadCases(lm)
  const open = async (coBatch: boolean) => {
    const server = await serve(coBatch)
    const backend = Remote.backend({ url: server.url, apiKey: KEY })
    const load = (perClient: number) =>
      Promise.all(
        Array.from({ length: clients }, async (_, c) => {
          const out: Array<readonly [Case, Exit.Exit<Local.Outcome, unknown>]> = []
          for (let r = 0; r < perClient; r++) {
            const kase = cases[(c * perClient + r * 7) % cases.length]
            const { graph, feeds, rows } = kase
            out.push([kase, await Effect.runPromiseExit(backend.execute({ runtime: lm.runtime, graph, feeds, rows }))])
          }
          return out
        })
      ).then((all) => all.flat())
    const stats = async () => (await (await fetch(`${server.url}/v1/stats`, { headers: { authorization: `Bearer ${KEY}` } })).json()) as Record<string, number>
    const timed = async (): Promise<Round> => {
      const before = await stats()
      const cpu0 = server.cpu()
      const own0 = process.cpuUsage()
      const t0 = performance.now()
      // results are checked after the clock stops: the check is the benchmark's, not a client's work
      const done = await load(requests)
      const seconds = (performance.now() - t0) / 1000
      const serverCpu = server.cpu() - cpu0
      const own = process.cpuUsage(own0)
      let wrong = 0
      for (const [{ expected }, exit] of done) {
        if (Exit.isFailure(exit)) {
          wrong++
          continue
        }
        for (const [id, want] of expected.values) {
          const got = exit.value.values.get(id) as Tensor | undefined
          if (got === undefined || !got.allClose(want as Tensor, 1e-6, 1e-6)) wrong++
        }
      }
      const after = await stats()
      return { seconds, wrong, runs: after.runs - before.runs, largestBatch: after.largestBatch, serverCpu, clientCpu: (own.user + own.system) / 1e6 }
    }
    try {
      for (const c of cases) await Effect.runPromise(backend.execute({ runtime: lm.runtime, ...c }))
      for (let k = 0; k < warmRounds; k++) await load(requests)
    } catch (e) {
      server.stop()
      throw e
    }
    return { timed, stop: server.stop }
  }
  const servers: Array<{ readonly timed: () => Promise<Round>; readonly stop: () => void }> = []
  try {
    const sequentialServer = await open(false)
    servers.push(sequentialServer)
    const coBatchingServer = await open(true)
    servers.push(coBatchingServer)
    const seq: Array<Round> = []
    const cob: Array<Round> = []
    for (let k = 0; k < rounds; k++) {
      seq.push(await sequentialServer.timed())
      cob.push(await coBatchingServer.timed())
    }
    const mid = <A>(xs: ReadonlyArray<A>, f: (a: A) => number) => median(xs.map(f))
    return {
      clients,
      requests,
      warm_rounds: warmRounds,
      sequential_s: mid(seq, (r) => r.seconds),
      cobatched_s: mid(cob, (r) => r.seconds),
      throughput_x: median(seq.map((r, k) => r.seconds / cob[k].seconds)),
      throughput_by_round: seq.map((r, k) => round(r.seconds / cob[k].seconds)),
      wrong: [...seq, ...cob].reduce((a, r) => a + r.wrong, 0),
      server_cpu_s: { sequential: round(mid(seq, (r) => r.serverCpu)), cobatched: round(mid(cob, (r) => r.serverCpu)) },
      // the clients share the machine's cores with the server
      client_cpu_s: { sequential: round(mid(seq, (r) => r.clientCpu)), cobatched: round(mid(cob, (r) => r.clientCpu)) },
      forward_passes: { sequential: mid(seq, (r) => r.runs), cobatched: mid(cob, (r) => r.runs), largest_batch: Math.max(...cob.map((r) => r.largestBatch)) }
    }
  } finally {
    for (const s of servers) s.stop()
    await lm.close()
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify(await measure()))
}
