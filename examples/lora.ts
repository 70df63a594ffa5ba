/**
 * Train a rank-4 LoRA adapter on one MLP of stories260K inside a session,
 * then generate with and without it.
 *
 * The adapter adds `x @ A @ B` to the output of layer 2's MLP, where `x` is
 * the MLP's input. `A` and `B` are session variables: each pass of the loop
 * over the data set runs one trace (forward, loss, backward) and one SGD
 * step on them, all inside ONE session graph, which could as well be sent to
 * a server. The objective: whatever the prompt, the next word is " dog"
 * (two tokens in this model's 512-token vocabulary, "▁do" and "g", so the
 * loss is their teacher-forced cross-entropy).
 *
 * Run: npx tsx examples/lora.ts
 */
import { defaultModelDir, LanguageModel, Tensor, type TensorProxy } from "../src/index.js"

/** What a run of the example found, for the test that runs it. */
export interface LoraReport {
  readonly losses: ReadonlyArray<number>
  readonly before: string
  readonly after: string
  readonly targetBefore: number
  readonly targetAfter: number
}

const layer = 2
const rank = 4
const learningRate = 0.1
const epochs = 6
const data = [
  "Once upon a time, there was a little",
  "One day, Tom went to the park with his",
  "Lily looked out of the window and saw a big",
  "The girl was happy because she had a new",
  "In the garden, the boy found a small",
  "Mom said they could go and see the"
]
const heldOut = "Once upon a time, there was a big"

/** A seeded uniform generator (mulberry32): the run is the same every time. */
const random = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

/**
 * Trains the adapter and compares generations.
 *
 * @example
 * const report = await run(await LanguageModel.load(defaultModelDir))
 */
export const run = async (model: LanguageModel, log: (line: string) => void = console.log): Promise<LoraReport> => {
  // the word's tokens as they follow a prompt (without the BOS the tokenizer adds)
  const word = model.tokenizer.encode("a dog").slice(2)
  const suffix = " dog"
  const dim = model.config.hidden_size as number
  const r = random(0)
  // LoRA's usual start: A random and small, B zero, so the adapter starts as a no-op
  const a0 = Tensor.from(Array.from({ length: dim * rank }, () => (r() * 2 - 1) / Math.sqrt(dim)), "float32", [dim, rank])
  const b0 = Tensor.zeros([rank, dim])
  const items = Array.from({ length: epochs }, () => data.map((p) => p + suffix)).flat()
  /** -log P(word | prompt) from the logits of a prompt followed by the word. */
  const nll = (logits: TensorProxy) =>
    word
      .map((id, k) => logits.at(0, k - word.length - 1).logSoftmax().at(id))
      .reduce((a, b) => a.add(b))
      .neg()

  const trained = await model.session((s) => {
    const A = s.variable(a0)
    const B = s.variable(b0)
    const losses = s.list()
    s.iter(items, (prompt) => {
      s.trace(prompt, (m) => {
        const mlp = m.model.layers[layer].mlp
        mlp.output.update((o) => o.add(mlp.input.matmul(A).matmul(B)))
        const loss = nll(m.lm_head.output)
        const gA = A.grad
        const gB = B.grad
        loss.backward()
        losses.append(loss)
        // one SGD step, inside the graph
        A.update((a) => a.sub(gA.mul(learningRate)))
        B.update((b) => b.sub(gB.mul(learningRate)))
      })
    })
    return { A, B, losses }
  })
  const losses = (trained.losses as ReadonlyArray<Tensor>).map((l) => l.toNumbers()[0])
  const perEpoch = Array.from({ length: epochs }, (_, e) => losses.slice(e * data.length, (e + 1) * data.length))
  const mean = (xs: ReadonlyArray<number>) => xs.reduce((a, b) => a + b, 0) / xs.length
  perEpoch.forEach((l, e) => log(`epoch ${e + 1}: mean loss ${mean(l).toFixed(3)}`))

  // the adapter as an edit: every later trace and generation of `tuned` applies it
  const { A, B } = trained
  const tuned = model.edit((m) => {
    const mlp = m.model.layers[layer].mlp
    mlp.output.update((o) => o.add(mlp.input.matmul(A).matmul(B)))
  })
  const probability = async (lm: LanguageModel) => Math.exp(-(await lm.trace(heldOut + suffix, (m) => nll(m.lm_head.output))).toNumbers()[0])
  const generate = async (lm: LanguageModel) => model.tokenizer.decode((await lm.generate(heldOut, { maxNewTokens: 8 })).toNumbers().slice(0))
  const report: LoraReport = {
    losses: perEpoch.map(mean),
    before: await generate(model),
    after: await generate(tuned),
    targetBefore: await probability(model),
    targetAfter: await probability(tuned)
  }
  log(`\nheld-out prompt: "${heldOut}"`)
  log(`P(" dog" next) without the adapter: ${report.targetBefore.toFixed(4)}, with it: ${report.targetAfter.toFixed(4)}`)
  log(`without: ${report.before}`)
  log(`with:    ${report.after}`)
  return report
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const model = await LanguageModel.load(defaultModelDir)
  try {
    await run(model)
  } finally {
    await model.close()
  }
}
