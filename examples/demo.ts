/**
 * The main job: load the embedded model (stories260K, a tiny trained Llama),
 * print its module tree, and predict the next token of a prompt through
 * nnsight-ts's loader and segments; then read, patch and ablate activations.
 *
 * Run: npm run demo
 */
import { defaultModelDir, LanguageModel } from "../src/index.js"

const model = await LanguageModel.load(defaultModelDir)
console.log(model.toString())

const prompt = "Once upon a time, there was a little girl named"
const { logits, hidden } = await model.trace(prompt, (m) => ({
  logits: m.lm_head.output.at(0, -1),
  hidden: m.model.layers[2].output
}))
const probs = logits.softmax()
const top = probs.argmax()
console.log(`\nPrompt: ${JSON.stringify(prompt)}`)
console.log(`Next token: ${JSON.stringify(model.tokenizer.token(top))} with probability ${(probs.data[top] as number).toFixed(4)}`)
console.log(`model.layers[2] output: shape [${hidden.shape}]`)

// activation patching: the last position of layer 2 from another prompt
const other = "Once upon a time, there was a little boy named"
const patched = await model.trace((m, t) => {
  const source = t.invoke(other, () => m.model.layers[2].output.at(":", -1))
  return t.invoke(prompt, () => {
    m.model.layers[2].output.setAt([":", -1], source)
    return { logits: m.lm_head.output.at(0, -1) }
  })
})
console.log(`Patched from ${JSON.stringify(other)} at layer 2: ${JSON.stringify(model.tokenizer.token(patched.logits.argmax()))}`)

// logit lens: each layer's residual stream read through the final norm and head
const lens = await model.trace(prompt, (m) =>
  [0, 1, 2, 3, 4].map((i) => m.lm_head.call(m.model.norm.call(m.model.layers[i].output.at(":", -1))).argmax(-1))
)
console.log(`Logit lens, layer by layer: ${lens.map((t) => JSON.stringify(model.tokenizer.token(t.item() as bigint))).join(" ")}`)

await model.close()
