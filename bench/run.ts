/**
 * Benchmarks: nnsight-ts traces against plain onnxruntime on the same model
 * in the same process (the baseline is one whole-model session with the same
 * thread settings), as ratios. Writes `bench/results.json`.
 *
 *     npm run bench                # stories260K and a GPT-2-small-sized model
 *     npm run bench -- --quick     # stories260K only
 *
 * `npm run bench` runs node with `--single-threaded-gc`, for the baseline
 * and the traces alike: on a machine with as many cores as onnxruntime has
 * threads (2 here), V8's parallel garbage-collector threads preempt
 * onnxruntime's, and a parallel operator waits for its slowest thread. With
 * them, even a trace that runs the very session the baseline runs measured
 * 1.10-1.13x on a 2-core machine; with the collector on the main thread
 * (its work still counted in the traces' time), 1.02-1.03x.
 */
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as ort from "onnxruntime-node"
import { LanguageModel, defaultModelDir } from "../src/index.js"
import * as Sessions from "../src/backends/Sessions.js"
import type * as Cobatch from "./cobatch.js"
import { compare, type Pairs, pairs, round, summarize } from "./harness.js"
import * as Gpt2 from "./models/gpt2.js"

const here = path.dirname(fileURLToPath(import.meta.url))
const quick = process.argv.includes("--quick")

interface Row {
  readonly name: string
  readonly model: string
  readonly baseline_ms: number
  readonly traced_ms: number
  readonly ratio: number
  readonly [extra: string]: unknown
}
const results: Array<Row> = []

interface Case {
  readonly label: string
  readonly dir: string
  readonly layers: string
  readonly nLayers: number
  readonly mlp: string
  readonly prompt: ReadonlyArray<number>
  readonly runs: number
  /** Rounds over the scenarios (a)-(d). */
  readonly rounds: number
}

const ids = (n: number, vocab: number) => Array.from({ length: n }, (_, i) => (i * 7919 + 13) % vocab)

const cases: Array<Case> = [
  { label: "stories260K", dir: defaultModelDir, layers: "model.layers", nLayers: 5, mlp: "mlp", prompt: ids(64, 512), runs: 200, rounds: 1 }
]
if (!quick) {
  const dir = path.join(here, ".cache", "gpt2-small-seed0")
  const t0 = performance.now()
  const { generated } = await Gpt2.writeModelDir(dir, Gpt2.small, 0)
  if (generated) console.log(`generated GPT-2-small-sized model in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
  cases.push({ label: "gpt2-small (124M, random weights)", dir, layers: "transformer.h", nLayers: 12, mlp: "mlp", prompt: ids(64, 50257), runs: 60, rounds: 3 })
}

const at = (m: any, p: string) => p.split(".").reduce((e: any, k: string) => e[k], m)

for (const c of cases) {
  const model = await LanguageModel.load(c.dir)
  const modelPath = path.join(c.dir, "onnx", "model.onnx")
  const baseline = await ort.InferenceSession.create(modelPath, Sessions.sessionOptions())
  const feeds1 = Object.fromEntries(Object.entries(model.batch([c.prompt]).feeds).map(([k, v]) => [k, v.toOrt()]))
  const other = c.prompt.map((t, i) => (i === 3 ? (t + 1) % 500 : t))
  const feeds2 = Object.fromEntries(Object.entries(model.batch([c.prompt, other]).feeds).map(([k, v]) => [k, v.toOrt()]))
  const plain1 = () => baseline.run(feeds1)
  const plain2 = () => baseline.run(feeds2)
  // warm up to the steady state: a write pattern gets its own sessions once it makes up
  // three quarters of the last 16 write passes (see WritePatterns in src/backends/Local.ts)
  const options = { runs: c.runs, warmup: Math.max(16, c.runs / 10) }

  const scenarios: ReadonlyArray<readonly [string, () => Promise<unknown>, () => Promise<unknown>]> = [
    ["(a) trace, no interventions", plain1, () => model.trace(c.prompt, (m) => ({ logits: m.output }))],
    [
      "(b) save every decoder layer's output",
      plain1,
      () =>
        model.trace(c.prompt, (m) => ({
          logits: m.output,
          layers: Array.from({ length: c.nLayers }, (_, k) => at(m, c.layers)[k].output)
        }))
    ],
    [
      "(c) zero-ablate one MLP",
      plain1,
      () =>
        model.trace(c.prompt, (m) => {
          at(m, c.layers)[1][c.mlp].output.set(0)
          return { logits: m.output }
        })
    ],
    [
      "(d) 2-invoke activation patch",
      plain2,
      () =>
        model.trace((m, t) => {
          const src = t.invoke(c.prompt, () => at(m, c.layers)[1].output.at(":", -1))
          return t.invoke(other, () => {
            at(m, c.layers)[1].output.setAt([":", -1], src)
            return { logits: m.output }
          })
        })
    ]
  ]
  // in rounds over the scenarios, so each samples several stretches of a noisy machine
  const timings = scenarios.map((): Pairs => ({ a: [], b: [] }))
  const roundRatios = scenarios.map((): Array<number> => [])
  const newSessions = scenarios.map(() => 0)
  for (let pass = 0; pass < c.rounds; pass++) {
    for (const [k, [, base, traced]] of scenarios.entries()) {
      const here = await pairs(base, traced, { runs: Math.ceil(c.runs / c.rounds), warmup: options.warmup })
      here.a.forEach((x, i) => (timings[k].a.push(x), timings[k].b.push(here.b[i])))
      roundRatios[k].push(summarize(here).ratio)
      const before = model.runtime.sessions.created()
      await traced()
      newSessions[k] = Math.max(newSessions[k], model.runtime.sessions.created() - before)
    }
  }
  for (const [k, [name]] of scenarios.entries()) {
    const r = summarize(timings[k])
    const spread = [Math.min(...roundRatios[k]), Math.max(...roundRatios[k])]
    results.push({ name, model: c.label, ...r, ratio_by_round: roundRatios[k], tokens: c.prompt.length, new_sessions_on_repeat: newSessions[k] })
    console.log(
      `${c.label.padEnd(36)} ${name.padEnd(40)} baseline ${r.baseline_ms} ms  traced ${r.traced_ms} ms  ratio ${r.ratio} (rounds ${spread.join("-")})  new sessions on repeat: ${newSessions[k]}`
    )
  }
  // (g) one forward and one backward in a trace, against a plain forward
  {
    const backward = () =>
      model.trace(c.prompt, (m) => {
        const g = at(m, c.layers)[Math.floor(c.nLayers / 2)].output.grad
        m.output.at(0, -1, 5).backward()
        return { g }
      })
    const r = await compare(plain1, backward, { runs: Math.max(5, c.runs / 3), warmup: 16 })
    results.push({ name: "(g) trace with one forward and one backward (vs plain forward)", model: c.label, ...r, tokens: c.prompt.length })
    console.log(`${c.label.padEnd(36)} forward+backward ${r.traced_ms} ms vs forward ${r.baseline_ms} ms: ratio ${r.ratio}`)
  }

  // (e) scan against trace on a 300-token input (issue: scan at least 20x faster)
  {
    const long = ids(300, c.label.startsWith("stories") ? 512 : 50257)
    const fn = (m: any) => ({ logits: m.output, layers: Array.from({ length: c.nLayers }, (_, k) => at(m, c.layers)[k].output) })
    const r = await compare(() => model.trace(long, fn), () => model.scan(long, fn), { runs: Math.max(5, c.runs / 5), warmup: 2 })
    results.push({
      name: "(e) scan vs trace, 300 tokens (baseline = trace, traced = scan)",
      model: c.label,
      ...r,
      speedup: round(r.baseline_ms / r.traced_ms, 1),
      tokens: 300
    })
    console.log(`${c.label.padEnd(36)} scan ${r.traced_ms} ms vs trace ${r.baseline_ms} ms: ${round(r.baseline_ms / r.traced_ms, 1)}x faster`)
  }

  // (f) generation with the KV cache: plain onnxruntime greedy loop vs generate saving every layer at every step
  {
    const newTokens = c.label.startsWith("stories") ? 64 : 64
    const promptIds = c.prompt.slice(0, 16)
    const plainGenerate = async () => {
      let feeds: Record<string, ort.Tensor> = Object.fromEntries(Object.entries(model.batch([promptIds]).feeds).map(([k, v]) => [k, v.toOrt()]))
      const tokens = [...promptIds]
      for (let step = 0; step < newTokens; step++) {
        const out = await baseline.run(feeds)
        const logits = out.logits
        const [, seq, vocab] = logits.dims
        const data = logits.data as Float32Array
        let best = 0
        for (let v = 1; v < vocab; v++) if (data[(seq - 1) * vocab + v] > data[(seq - 1) * vocab + best]) best = v
        tokens.push(best)
        const next: Record<string, ort.Tensor> = {
          input_ids: new ort.Tensor("int64", BigInt64Array.of(BigInt(best)), [1, 1]),
          attention_mask: new ort.Tensor("int64", new BigInt64Array(tokens.length).fill(1n), [1, tokens.length]),
          position_ids: new ort.Tensor("int64", BigInt64Array.of(BigInt(tokens.length - 1)), [1, 1])
        }
        for (const name of Object.keys(feeds)) {
          if (name.startsWith("past_key_values.")) next[name] = out[name.replace("past_key_values.", "present.")]
        }
        feeds = next
      }
      return tokens
    }
    const traced = () =>
      model.generate(promptIds, { maxNewTokens: newTokens, eosTokenId: [] }, (m, t) => ({
        tokens: m.generator.output,
        layers: t.all(() => Array.from({ length: c.nLayers }, (_, k) => at(m, c.layers)[k].output))
      }))
    // in rounds too: a generation takes seconds, and a few pairs would sample one stretch of the machine
    const all: Pairs = { a: [], b: [] }
    const byRound: Array<number> = []
    for (let pass = 0; pass < c.rounds; pass++) {
      const here = await pairs(plainGenerate, traced, { runs: c.label.startsWith("stories") ? 10 : 5, warmup: 1 })
      here.a.forEach((x, i) => (all.a.push(x), all.b.push(here.b[i])))
      byRound.push(summarize(here).ratio)
    }
    const r = summarize(all)
    results.push({ name: `(f) generate ${newTokens} tokens saving every layer's output at every step (KV cache)`, model: c.label, ...r, ratio_by_round: byRound, tokens: promptIds.length })
    console.log(`${c.label.padEnd(36)} generate ${newTokens}: plain ${r.baseline_ms} ms, traced ${r.traced_ms} ms, ratio ${r.ratio} (rounds ${byRound.join(", ")})`)
  }

  await baseline.release()
  await model.close()

  // memory of a layer sweep, in a fresh process
  const out = execFileSync(
    process.execPath,
    ["--import", "tsx", path.join(here, "sweep.ts"), c.dir, c.layers, String(c.nLayers), String(Math.min(c.prompt.length, 32))],
    { encoding: "utf8" }
  )
  const sweep = JSON.parse(out.trim().split("\n").pop()!)
  const ratio = round(sweep.max_rss_bytes / sweep.weights_bytes, 3)
  results.push({
    name: "layer sweep: peak resident memory / weight bytes",
    model: c.label,
    baseline_ms: 0,
    traced_ms: round(sweep.elapsed_ms),
    ratio,
    weights_mb: round(sweep.weights_bytes / 2 ** 20, 1),
    max_rss_mb: round(sweep.max_rss_bytes / 2 ** 20, 1),
    sessions: sweep.sessions
  })
  console.log(`${c.label.padEnd(36)} layer sweep: peak RSS ${round(sweep.max_rss_bytes / 2 ** 20, 1)} MB for ${round(sweep.weights_bytes / 2 ** 20, 1)} MB of weights (${ratio}x)`)
}

// remote throughput: a co-batching server against one that runs each request alone
{
  // in a child process with Node's default collector: its clients share the cores with the server
  const line = execFileSync(process.execPath, ["--import", "tsx", path.join(here, "cobatch.ts")], { encoding: "utf8" }).trim().split("\n").pop()!
  const r = JSON.parse(line) as Awaited<ReturnType<typeof Cobatch.measure>>
  if (r.wrong > 0) throw new Error(`co-batching benchmark: ${r.wrong} wrong results`)
  results.push({
    name: "remote: 32 clients x 10 requests on loopback (baseline = sequential server, traced = co-batching server)",
    model: "stories260K",
    baseline_ms: round(r.sequential_s * 1000),
    traced_ms: round(r.cobatched_s * 1000),
    ratio: round(r.cobatched_s / r.sequential_s, 3),
    throughput_x: round(r.throughput_x, 2),
    throughput_by_round: r.throughput_by_round,
    server_cpu_s: r.server_cpu_s,
    client_cpu_s: r.client_cpu_s,
    forward_passes: r.forward_passes
  })
  console.log(`remote co-batching: ${round(r.throughput_x, 2)}x the throughput of a sequential server (${r.clients} clients x ${r.requests} requests)`)
}

fs.writeFileSync(path.join(here, "results.json"), JSON.stringify(results, null, 2) + "\n")
console.log(`wrote ${path.join(here, "results.json")}`)
