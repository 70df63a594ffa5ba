/**
 * The main job: a short interpretability tour of the embedded model
 * (stories260K, a tiny trained Llama) — its module tree, its next-token
 * prediction, a generated story, a steering intervention on every generation
 * step, an activation patch across two prompts, and a logit lens.
 *
 * Run: npm run demo
 */
import { defaultModelDir, LanguageModel } from "../src/index.js"

const model = await LanguageModel.load(defaultModelDir)
const say = (s = "") => console.log(s)
const show = (ids: ReadonlyArray<number | bigint>) => JSON.stringify(model.tokenizer.decode(ids))

say("The module tree of stories260K:")
say(model.toString())

const prompt = "Once upon a time, there was a little girl named"
const { logits } = await model.trace(prompt, (m) => ({ logits: m.lm_head.output.at(0, -1) }))
const probs = logits.softmax()
const top = probs.argmax()
say(`\nPrompt: ${JSON.stringify(prompt)}`)
say(`Next token: ${JSON.stringify(model.tokenizer.token(top))} with probability ${(probs.data[top] as number).toFixed(4)}`)

// a story, greedily
const story = await model.generate(prompt, { maxNewTokens: 24 })
say(`\nGenerated: ${show(story.toNumbers().slice(1))}`)

// steering on every step: push layer 3's input from " Lily" towards " Tim"
const lily = model.tokenizer.encode(" Lily").at(-1)!
const tim = model.tokenizer.encode(" Tim").at(-1)!
const steered = await model.generate(prompt, { maxNewTokens: 24 }, (m, t) => {
  const table = m.model.embed_tokens.weight
  const direction = table.at(tim).sub(table.at(lily)).mul(2)
  t.all(() => m.model.layers[3].input.update((x) => x.add(direction)))
  return m.generator.output
})
say(`Steered (layer 3 input += 2·(emb[" Tim"] − emb[" Lily"]) on every step): ${show(steered.toNumbers().slice(1))}`)

// activation patching: layer 2's last position from another prompt, one batched run
const other = "Once upon a time, there was a little boy named"
const patched = await model.trace((m, t) => {
  const source = t.invoke(other, () => m.model.layers[2].output.at(":", -1))
  return t.invoke(prompt, () => {
    m.model.layers[2].output.setAt([":", -1], source)
    return { logits: m.lm_head.output.at(0, -1) }
  })
})
say(`\nPatched layer 2 (last position) from ${JSON.stringify(other)}: next token ${JSON.stringify(model.tokenizer.token(patched.logits.argmax()))}`)

// logit lens: each layer's residual stream read through the final norm and head
const lens = await model.trace(prompt, (m) =>
  [0, 1, 2, 3, 4].map((i) => m.lm_head.call(m.model.norm.call(m.model.layers[i].output.at(":", -1))).argmax(-1))
)
say(`Logit lens, layer by layer: ${lens.map((t) => JSON.stringify(model.tokenizer.token(t.item() as bigint))).join(" ")}`)

await model.close()
