/**
 * Generation: repeated forward passes of a causal language model, each one a
 * pass of the same intervention run (so step `s` of generation is call `s`
 * of every module), choosing each next token greedily or by seeded sampling.
 * With KV-cache inputs (`past_key_values.N.key/value` → `present.N.key/value`)
 * each later step feeds one token and the previous presents; without them,
 * each step recomputes the whole sequence. Rows stop at their end-of-sequence
 * token (padding after it); generation stops when every row has.
 *
 * @example
 * import * as Generate from "./Generate.js"
 * const { outcome, tokens } = yield* Generate.run(runtime, { graph, feeds, rows }, { maxNewTokens: 8 })
 *
 * @since 0.1.0
 */
import { Effect } from "effect"
import type * as Errors from "../core/Errors.js"
import type * as Graph from "../core/Graph.js"
import { Tensor } from "../core/Tensor.js"
import * as Local from "./Local.js"

/**
 * Options of a generation.
 *
 * @since 0.1.0
 */
export interface Options {
  /** New tokens to generate (forward passes to run). */
  readonly maxNewTokens: number
  /** Sample instead of taking the most likely token. */
  readonly doSample?: boolean
  /** Divides logits before sampling (default 1). */
  readonly temperature?: number
  /** Samples among the `topK` most likely tokens only. */
  readonly topK?: number
  /** Samples among the most likely tokens whose probabilities sum to `topP`. */
  readonly topP?: number
  /** Seed of the sampler (default 0): the same seed gives the same tokens. */
  readonly seed?: number
  /** Token(s) that end a row. */
  readonly eosTokenId?: number | ReadonlyArray<number>
  /** Token written after a row ended (default: the model's pad token). */
  readonly padTokenId?: number
  /** Use the KV cache when the model has one (default true). */
  readonly useCache?: boolean
  /** Called after every step with the new token of each row. */
  readonly onToken?: (event: { readonly step: number; readonly tokens: ReadonlyArray<number>; readonly finished: ReadonlyArray<boolean> }) => void
}

/**
 * One generation request.
 *
 * @since 0.1.0
 */
export interface Request {
  readonly graph: Graph.Graph
  readonly feeds: Readonly<Record<string, Tensor>>
  readonly rows: ReadonlyArray<Local.Rows>
}

/** mulberry32: a small, seedable PRNG. */
const prng = (seed: number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/**
 * Picks the next token from one row of logits.
 *
 * @example
 * Generate.choose(Float32Array.of(0.1, 2, 0.3), { maxNewTokens: 1 }, Math.random) // 1
 *
 * @since 0.1.0
 */
export const choose = (logits: ArrayLike<number>, options: Options, random: () => number): number => {
  const n = logits.length
  if (!options.doSample) {
    // the best value in a local: this loop runs over the whole vocabulary at every step
    let best = 0
    let top = logits[0]
    for (let i = 1; i < n; i++) {
      const v = logits[i]
      if (v > top) {
        top = v
        best = i
      }
    }
    return best
  }
  const temperature = options.temperature ?? 1
  let order = Array.from({ length: n }, (_, i) => i).sort((a, b) => logits[b] - logits[a])
  if (options.topK !== undefined && options.topK > 0) order = order.slice(0, options.topK)
  const max = logits[order[0]]
  const weights = order.map((i) => Math.exp((logits[i] - max) / temperature))
  const total = weights.reduce((a, b) => a + b, 0)
  let probs = weights.map((w) => w / total)
  if (options.topP !== undefined && options.topP < 1) {
    let acc = 0
    let keep = 0
    while (keep < probs.length && acc < options.topP) acc += probs[keep++]
    order = order.slice(0, Math.max(1, keep))
    const kept = probs.slice(0, order.length)
    const sum = kept.reduce((a, b) => a + b, 0)
    probs = kept.map((p) => p / sum)
  }
  let r = random()
  for (let k = 0; k < order.length; k++) {
    r -= probs[k]
    if (r <= 0) return order[k]
  }
  return order[order.length - 1]
}

const int64 = (rows: ReadonlyArray<ReadonlyArray<number>>): Tensor => {
  const width = rows[0]?.length ?? 0
  const data = new BigInt64Array(rows.length * width)
  rows.forEach((r, i) => r.forEach((v, j) => (data[i * width + j] = BigInt(v))))
  return new Tensor("int64", [rows.length, width], data)
}

const presentOf = (past: string): string => past.replace(/^past_key_values\./, "present.").replace(/^past\./, "present.")

/**
 * Frees a tensor's storage now, when it owns a whole buffer, by detaching the
 * buffer (structured-clone transfer) and dropping the clone.
 *
 * Why: a KV cache is mostly external memory (the ArrayBuffers onnxruntime
 * makes for every step's outputs), and V8 frees a buffer only once its holder
 * is collected. A holder that lived across a run (the generator suspended on
 * it) can be promoted to the old generation and then keeps a dead step's
 * cache until the next full collection. Measured on GPT-2-small: without
 * this, a generation's buffer memory grew by every step's cache between full
 * collections, where minor collections freed a plain onnxruntime loop's.
 */
const release = (t: Tensor | undefined): void => {
  const data = t?.data
  if (!ArrayBuffer.isView(data)) return
  const buffer = data.buffer
  // a view into a shared or larger buffer may not be ours alone
  if (!(buffer instanceof ArrayBuffer) || data.byteOffset !== 0 || data.byteLength !== buffer.byteLength) return
  try {
    structuredClone(buffer, { transfer: [buffer] })
  } catch {
    // a buffer that cannot be detached is left to the collector
  }
}

/**
 * Runs a generation with its interventions.
 *
 * @example
 * const { outcome, tokens } = yield* Generate.run(runtime, request, { maxNewTokens: 6 })
 *
 * @since 0.1.0
 */
export const run = (
  rt: Local.Runtime,
  req: Request,
  options: Options
): Effect.Effect<{ readonly outcome: Local.Outcome; readonly tokens: Tensor }, Errors.TraceError> =>
  Effect.gen(function*() {
    const inputNames = rt.loaded.model.graph.inputs.map((v) => v.name)
    const pastNames = inputNames.filter((n) => n.startsWith("past_key_values.") || n.startsWith("past."))
    const outputNames = new Set(rt.loaded.model.graph.outputs.map((o) => o.name))
    const useCache = (options.useCache ?? true) && pastNames.length > 0 && pastNames.every((p) => outputNames.has(presentOf(p)))
    const eos = new Set(options.eosTokenId === undefined ? [] : typeof options.eosTokenId === "number" ? [options.eosTokenId] : options.eosTokenId)
    const pad = options.padTokenId ?? 0
    const random = prng(options.seed ?? 0)

    const ids0 = req.feeds.input_ids
    const batch = ids0.shape[0]
    const tokens: Array<Array<number>> = (ids0.toArray() as ReadonlyArray<ReadonlyArray<bigint>>).map((r) => r.map(Number))
    const mask: Array<Array<number>> = req.feeds.attention_mask
      ? (req.feeds.attention_mask.toArray() as ReadonlyArray<ReadonlyArray<bigint>>).map((r) => r.map(Number))
      : tokens.map((r) => r.map(() => 1))
    const finished = new Array<boolean>(batch).fill(false)
    const run = yield* Local.start(rt, req.graph, req.rows)
    const logitsName = outputNames.has("logits") ? "logits" : rt.loaded.model.graph.outputs[0].name
    const presents = new Map(pastNames.map((name) => [name, presentOf(name)]))
    // what a step may free once used: cache inputs and logits the graph does not hold
    const releasable = pastNames.filter((name) => !run.held(name) && !run.held(presents.get(name)!))
    const releaseLogits = !run.held(logitsName)
    let feeds: Record<string, Tensor> = { ...req.feeds }

    for (let step = 0; step < options.maxNewTokens; step++) {
      const outputs = yield* run.forward(feeds, step)
      if (run.stopped()) break
      const logits = outputs.get(logitsName)!
      const [, seq, vocab] = logits.shape
      const data = logits.data as Float32Array
      const next = Array.from({ length: batch }, (_, b) => {
        if (finished[b]) return pad
        const row = data.subarray((b * seq + seq - 1) * vocab, (b * seq + seq) * vocab)
        return choose(row, options, random)
      })
      next.forEach((t, b) => {
        tokens[b].push(t)
        mask[b].push(1)
        if (eos.has(t)) finished[b] = true
      })
      options.onToken?.({ step, tokens: next, finished: [...finished] })
      if (finished.every(Boolean) || step + 1 === options.maxNewTokens) break

      // the next step's inputs; this step's cache inputs, made by the last step, are used up
      const used = step > 0 && useCache ? releasable.map((name) => feeds[name]) : []
      if (releaseLogits) used.push(logits)
      const positions = mask.map((r) => {
        let p = -1
        return r.map((m) => (m ? ++p : 1))
      })
      if (useCache) {
        feeds = {}
        for (const name of inputNames) {
          if (name === "input_ids") feeds[name] = int64(next.map((t) => [t]))
          else if (name === "attention_mask") feeds[name] = int64(mask)
          else if (name === "position_ids") feeds[name] = int64(positions.map((r) => [r[r.length - 1]]))
          else feeds[name] = outputs.get(presents.get(name)!)!
        }
      } else {
        feeds = { ...req.feeds }
        for (const name of inputNames) {
          if (name === "input_ids") feeds[name] = int64(tokens)
          else if (name === "attention_mask") feeds[name] = int64(mask)
          else if (name === "position_ids") feeds[name] = int64(positions)
        }
      }
      used.forEach(release)
    }
    const generated = int64(tokens)
    yield* run.complete(generated)
    const outcome = yield* run.finish
    return { outcome, tokens: generated }
  })
