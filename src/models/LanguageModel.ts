/**
 * `LanguageModel`: a causal language model in the Hugging Face /
 * transformers.js layout (`config.json`, `tokenizer.json`, `onnx/model.onnx`),
 * traced with text. Prompts are tokenized and left-padded into one batch with
 * the attention mask and position ids the model needs; models with KV-cache
 * inputs get empty pasts.
 *
 * @example
 * import { LanguageModel } from "nnsight-ts"
 * const model = await LanguageModel.load("models/stories260K")
 * const { logits } = await model.trace("Once upon a time", (m) => ({ logits: m.lm_head.output }))
 * model.tokenizer.decode([logits.at(0, -1).argmax()])
 *
 * @since 0.1.0
 */
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers"
import { Effect } from "effect"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import { Tensor } from "../core/Tensor.js"
import { Backend } from "../backends/Backend.js"
import * as Hub from "./Hub.js"
import * as Onnx from "./Onnx.js"
import * as Generate from "../backends/Generate.js"
import * as Remote from "../remote/Client.js"
import * as Tracer from "../core/Tracer.js"
import { type Batch, type LoadOptions as BaseLoadOptions, materialize, readBytes, runPromise, TracedModel } from "./NNsight.js"

/**
 * Options of {@link LanguageModel.generate}.
 *
 * @since 0.1.0
 */
export type GenerateOptions = Generate.Options & {
  /** Generate on an nnsight-ts server instead. */
  readonly remote?: Remote.Options
}

/**
 * The root envoy in a generation: the model's modules, plus `generator`.
 *
 * @since 0.1.0
 */
export type GenerateEnvoy = Tracer.Envoy & { readonly generator: { readonly output: Tracer.TensorProxy } }

/**
 * What a language model takes as input: a prompt, several prompts (one batch
 * row each), token ids (one row or several), or ready tensors.
 *
 * @since 0.1.0
 */
export type Prompt =
  | string
  | ReadonlyArray<string>
  | ReadonlyArray<number>
  | ReadonlyArray<ReadonlyArray<number>>
  | { readonly input_ids: Tensor; readonly attention_mask?: Tensor }

/**
 * A tokenizer loaded from `tokenizer.json`.
 *
 * @since 0.1.0
 */
export interface Tokenizer {
  /** Token ids of a text, with the special tokens the model expects (e.g. `<s>`). */
  readonly encode: (text: string) => ReadonlyArray<number>
  /** The text of token ids. */
  readonly decode: (ids: ReadonlyArray<number | bigint>) => string
  /** One token as it reads inside a text (with its leading space). */
  readonly token: (id: number | bigint) => string
}

/**
 * Options of {@link LanguageModel.load}.
 *
 * @since 0.1.0
 */
export interface LoadOptions extends BaseLoadOptions {
  /** Where and how to download a Hugging Face hub repository (when `load` is given a repo id). */
  readonly hub?: Hub.Options
  /** Which ONNX file: `"default"` (model.onnx), `"quantized"`, `"fp16"`, or a path relative to the model folder. */
  readonly variant?: "default" | "quantized" | "fp16" | (string & {})
}

const candidates = (variant: string): ReadonlyArray<string> => {
  const suffix = variant === "default" ? "" : `_${variant}`
  return [
    `onnx/model${suffix}.onnx`,
    `onnx/decoder_model_merged${suffix}.onnx`,
    `model${suffix}.onnx`,
    `decoder_model_merged${suffix}.onnx`
  ]
}

const exists = (p: string) =>
  fs
    .access(p)
    .then(() => true)
    .catch(() => false)

const readJson = async (p: string): Promise<Record<string, unknown>> =>
  (await exists(p)) ? (JSON.parse(await fs.readFile(p, "utf8")) as Record<string, unknown>) : {}

/**
 * A traced causal language model.
 *
 * @since 0.1.0
 */
export class LanguageModel extends TracedModel<Prompt> {
  /** The Effect forms of the methods, with typed errors. */
  declare readonly effect: TracedModel<Prompt>["effect"] & {
    /** {@link LanguageModel.generate} as an Effect. */
    readonly generate: {
      (input: Prompt, options: GenerateOptions): Effect.Effect<Tensor, Errors.TraceError>
      <R>(
        input: Prompt,
        options: GenerateOptions,
        fn: (m: GenerateEnvoy, t: Tracer.Context<Prompt>) => R
      ): Effect.Effect<Tracer.Saved<R>, Errors.TraceError>
    }
  }

  /** The tokenizer. */
  tokenizer!: Tokenizer
  /** `config.json`. */
  config!: Readonly<Record<string, unknown>>
  /** `generation_config.json`. */
  generationConfig!: Readonly<Record<string, unknown>>

  /**
   * Loads a model folder (`config.json`, `tokenizer.json`,
   * `tokenizer_config.json`, and the ONNX file in `onnx/` or the root), or
   * a Hugging Face hub repository id (`"org/name"`), downloaded into the
   * cache first (see `Hub.download`).
   *
   * @example
   * const model = await LanguageModel.load("models/stories260K")
   *
   * @since 0.1.0
   */
  protected override makeEffect(): LanguageModel["effect"] {
    return Object.assign(super.makeEffect(), { generate: this.generateEffect.bind(this) }) as LanguageModel["effect"]
  }

  static async load(dirOrRepo: string, options: LoadOptions = {}): Promise<LanguageModel> {
    const variant = options.variant ?? "default"
    const isDir = await fs.stat(dirOrRepo).then((s) => s.isDirectory(), () => false)
    const dir = isDir ? dirOrRepo : await Hub.downloadPromise(dirOrRepo, { ...options.hub, variant: options.hub?.variant ?? variant })
    let file: string | undefined
    if (variant.endsWith(".onnx")) file = path.join(dir, variant)
    else {
      for (const c of candidates(variant)) {
        if (await exists(path.join(dir, c))) {
          file = path.join(dir, c)
          break
        }
      }
    }
    if (file === undefined) {
      throw new Errors.InvalidInput({ site: "", reason: `no ONNX model in ${dir} (looked for ${candidates(variant).join(", ")})` })
    }
    const config = await readJson(path.join(dir, "config.json"))
    const generationConfig = await readJson(path.join(dir, "generation_config.json"))
    const tokenizerJson = await readJson(path.join(dir, "tokenizer.json"))
    const tokenizerConfig = await readJson(path.join(dir, "tokenizer_config.json"))
    const architecture = (config.architectures as ReadonlyArray<string> | undefined)?.[0]
    const bytes = await readBytes(file)
    const { runtime, scope } = await TracedModel.open(bytes, {
      ...options,
      typeNames: options.typeNames ?? ((p, inferred) => (p === "" && architecture ? architecture : inferred))
    }, file)
    const model = new LanguageModel(runtime, scope, options.backend ?? Backend.local)
    ;(model as { effect: unknown }).effect = model.makeEffect()
    model.config = config
    model.generationConfig = generationConfig
    model.tokenizer = Object.keys(tokenizerJson).length > 0 ? makeTokenizer(tokenizerJson, tokenizerConfig) : noTokenizer(dir)
    return model
  }

  /**
   * Generates tokens with interventions. Step `s` of generation is call `s`
   * of every module: reads and sets address the first step unless moved by
   * `t.next()` / `envoy.next()`, or repeated by `t.all()` / `envoy.all(fn)` /
   * `envoy.iter(steps, fn)` (whose values come back as lists, one per step).
   * `m.generator.output` is the token ids, prompt included.
   *
   * @example
   * const { tokens, hidden } = await model.generate(prompt, { maxNewTokens: 3 }, (m, t) => ({
   *   tokens: m.generator.output,
   *   hidden: t.all(() => m.model.layers[4].output.at(":", -1)) // one per step
   * }))
   *
   * @since 0.1.0
   */
  generate(input: Prompt, options: GenerateOptions): Promise<Tensor>
  generate<R>(input: Prompt, options: GenerateOptions, fn: (m: GenerateEnvoy, t: Tracer.Context<Prompt>) => R): Promise<Tracer.Saved<R>>
  generate(input: Prompt, options: GenerateOptions, fn?: (m: GenerateEnvoy, t: Tracer.Context<Prompt>) => unknown): Promise<unknown> {
    return runPromise(this.generateEffect(input, options, fn))
  }

  private generateEffect<R>(
    input: Prompt,
    options: GenerateOptions,
    fn?: (m: GenerateEnvoy, t: Tracer.Context<Prompt>) => R
  ): Effect.Effect<Tracer.Saved<R> | Tensor, Errors.TraceError> {
    const self = this
    return Effect.gen(function*() {
      const body = fn ?? ((m: GenerateEnvoy) => m.generator.output)
      const recording = yield* Effect.try({
        try: () =>
          Tracer.record(self.runtime.loaded.tree.root, body as (m: Tracer.Envoy, t: Tracer.Context<Prompt>) => R, {
            input,
            hasInput: true,
            steps: options.maxNewTokens,
            edits: self.edits,
            extend: Tracer.generatorEnvoy
          }),
        catch: (e) => (Errors.isTraceError(e) ? e : new Errors.InvalidInput({ site: "", reason: e instanceof Error ? e.message : String(e) }))
      })
      const batch = yield* self.prepare(recording.inputs)
      const runner = options.remote ? Remote.generate(options.remote) : Generate.run
      const { outcome } = yield* runner(self.runtime, { graph: recording.graph, ...batch }, {
        eosTokenId: self.eosTokenIds,
        padTokenId: self.padTokenId,
        ...options
      })
      return materialize(recording.graph.result, outcome) as Tracer.Saved<R>
    })
  }

  /** End-of-sequence ids from `generation_config.json` or `config.json`. */
  get eosTokenIds(): ReadonlyArray<number> {
    const e = (this.generationConfig.eos_token_id ?? this.config.eos_token_id) as number | ReadonlyArray<number> | undefined
    return e === undefined ? [] : typeof e === "number" ? [e] : e
  }

  /** The id used to pad rows: `pad_token_id`, else `eos_token_id`, else 0. */
  get padTokenId(): number {
    const c = this.config as { pad_token_id?: number; eos_token_id?: number | ReadonlyArray<number> }
    const eos = Array.isArray(c.eos_token_id) ? c.eos_token_id[0] : c.eos_token_id
    return c.pad_token_id ?? (eos as number | undefined) ?? 0
  }

  /** Token rows of one invoke's prompt, with their attention masks. */
  rowsOf(prompt: Prompt): ReadonlyArray<{ readonly ids: ReadonlyArray<number>; readonly mask: ReadonlyArray<number> }> {
    const plain = (ids: ReadonlyArray<number>) => ({ ids, mask: ids.map(() => 1) })
    if (typeof prompt === "string") return [plain(this.tokenizer.encode(prompt))]
    if (prompt instanceof Tensor || (typeof prompt === "object" && !Array.isArray(prompt) && "input_ids" in prompt)) {
      const p = prompt as { input_ids: Tensor; attention_mask?: Tensor }
      const ids = p.input_ids.shape.length === 1 ? p.input_ids.reshape(1, -1) : p.input_ids
      const mask = p.attention_mask === undefined ? undefined : p.attention_mask.shape.length === 1 ? p.attention_mask.reshape(1, -1) : p.attention_mask
      const idRows = ids.toArray() as ReadonlyArray<ReadonlyArray<number | bigint>>
      const maskRows = mask?.toArray() as ReadonlyArray<ReadonlyArray<number | bigint>> | undefined
      return idRows.map((r, i) => ({ ids: r.map(Number), mask: maskRows ? maskRows[i].map(Number) : r.map(() => 1) }))
    }
    const list = prompt as ReadonlyArray<unknown>
    if (list.length === 0) throw new Errors.InvalidInput({ site: "", reason: "an empty prompt list" })
    if (typeof list[0] === "number") return [plain(list as ReadonlyArray<number>)]
    if (typeof list[0] === "string") return (list as ReadonlyArray<string>).map((s) => plain(this.tokenizer.encode(s)))
    return (list as ReadonlyArray<ReadonlyArray<number>>).map(plain)
  }

  protected override prepare(inputs: ReadonlyArray<Prompt>): Effect.Effect<Batch, Errors.TraceError> {
    return Effect.try({
      try: () => this.batch(inputs),
      catch: (e) => (Errors.isTraceError(e) ? e : new Errors.InvalidInput({ site: "", reason: e instanceof Error ? e.message : String(e) }))
    })
  }

  /**
   * Tokenizes and left-pads the invokes' prompts into one batch, with the
   * attention mask, position ids and empty KV-cache inputs the model takes.
   *
   * @example
   * model.batch(["a story", "another story"]).feeds.input_ids.shape // [2, n]
   *
   * @since 0.1.0
   */
  batch(inputs: ReadonlyArray<Prompt>): Batch {
    const perInvoke = inputs.map((p) => this.rowsOf(p))
    const all = perInvoke.flat()
    const width = Math.max(...all.map((r) => r.ids.length))
    const b = all.length
    const ids = new BigInt64Array(b * width).fill(BigInt(this.padTokenId))
    const mask = new BigInt64Array(b * width)
    const positions = new BigInt64Array(b * width)
    all.forEach((row, i) => {
      const offset = i * width + (width - row.ids.length)
      let pos = 0
      row.ids.forEach((id, k) => {
        ids[offset + k] = BigInt(id)
        mask[offset + k] = BigInt(row.mask[k])
        positions[offset + k] = BigInt(row.mask[k] ? pos : 1)
        if (row.mask[k]) pos++
      })
    })
    const feeds: Record<string, Tensor> = {}
    for (const v of this.runtime.loaded.model.graph.inputs) {
      const name = v.name
      if (name === "input_ids") feeds[name] = new Tensor("int64", [b, width], ids)
      else if (name === "attention_mask") feeds[name] = new Tensor("int64", [b, width], mask)
      else if (name === "position_ids") feeds[name] = new Tensor("int64", [b, width], positions)
      else if (name.startsWith("past_key_values") || name.startsWith("past.")) feeds[name] = emptyPast(v, b)
      else throw new Errors.InvalidInput({ site: "", reason: `do not know how to fill the model input "${name}"` })
    }
    const rows: Array<{ start: number; count: number }> = []
    let start = 0
    for (const p of perInvoke) {
      rows.push({ start, count: p.length })
      start += p.length
    }
    return { feeds, rows }
  }
}

/** A KV-cache input with no past: its sequence dimension is 0. */
const emptyPast = (v: Onnx.ValueInfo, batch: number): Tensor => {
  const type = Onnx.tensorType(v)
  const dtype = DType.fromOnnx(type?.elemType ?? 1) ?? "float32"
  const dims = (type?.shape ?? []).map((d, i) => (i === 0 ? batch : d._tag === "Value" ? d.value : 0))
  return new Tensor(dtype, dims, DType.arrayFor(dtype, 0))
}

const noTokenizer = (dir: string): Tokenizer => {
  const fail = (): never => {
    throw new Errors.InvalidInput({ site: "", reason: `${dir} has no tokenizer.json: pass token ids instead of text` })
  }
  return { encode: fail, decode: fail, token: fail }
}

const makeTokenizer = (json: Record<string, unknown>, config: Record<string, unknown>): Tokenizer => {
  const tok = new HfTokenizer(json as never, config as never)
  const vocab = (json.model as { vocab?: Record<string, number> } | undefined)?.vocab ?? {}
  const pieces = new Map(Object.entries(vocab).map(([piece, id]) => [id, piece]))
  return {
    encode: (text) => tok.encode(text).ids,
    decode: (ids) => tok.decode(ids.map(Number)),
    token: (id) => {
      const text = tok.decode([Number(id)])
      // SentencePiece drops a leading space at the start of a text; keep it
      const piece = pieces.get(Number(id))
      return piece?.startsWith("\u2581") ? " " + text.replace(/^ /, "") : text
    }
  }
}
