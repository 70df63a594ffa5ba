/**
 * Remote execution: host the embedded model (stories260K) on a server in
 * this process, then run traces on it as a client would from another
 * machine — the same call with a remote backend, the same results; progress
 * events; a non-blocking job; a typed error from the server with your line.
 *
 * A standalone server is the command line:
 *   npx nnsight-ts keygen --id alice            # a key and its hashed key-file entry
 *   npx nnsight-ts serve --model models/stories260K --keys keys.json --port 8470
 *
 * Run: npx tsx examples/remote.ts
 */
import { defaultModelDir, type Envoy, Errors, LanguageModel, Tensor } from "../src/index.js"
import * as Remote from "../src/remote/Client.js"
import * as Server from "../src/remote/Server.js"

const say = (s = "") => console.log(s)

// the server: its own copy of the model, one API key (kept hashed in memory)
const apiKey = Server.generateKey()
const hosted = await LanguageModel.load(defaultModelDir)
const server = await Server.start({ models: [{ key: "stories260K", model: hosted }], keys: [{ id: "alice", key: apiKey }], port: 0 })
say(`server on ${server.url}`)

// the client: the model loaded locally (for its module tree and tokenizer), a remote backend
const model = await LanguageModel.load(defaultModelDir)
const remote = Remote.backend({ url: server.url, apiKey, progress: (line) => say(`  ${line}`) })

const prompt = "Once upon a time, there was a little girl named"
const fn = (m: Envoy) => ({ logits: m.lm_head.output.at(0, -1) })
say("\nA trace on the server:")
const there = await model.trace(prompt, fn, { backend: remote })
const here = await model.trace(prompt, fn)
say(`next token: ${JSON.stringify(model.tokenizer.token(there.logits.argmax()))}; equal to the local run: ${there.logits.equals(here.logits)}`)

// activation patching across two invokes, remotely
const patched = await model.trace((m, t) => {
  const boy = t.invoke("Once upon a time, there was a little boy named", () => m.model.layers[2].output.at(":", -1))
  return t.invoke(prompt, () => {
    m.model.layers[2].output.setAt([":", -1], boy)
    return { logits: m.lm_head.output.at(0, -1) }
  })
}, { backend: remote })
say(`patched next token: ${JSON.stringify(model.tokenizer.token(patched.logits.argmax()))}`)

// non-blocking: submit, do other things, collect later (prompts are tokenized on the server)
const { graph } = model.record(prompt, (m) => ({ hidden: m.model.layers[4].output.at(0, -1) }))
const job = await Remote.submit({ url: server.url, apiKey }, { kind: "trace", runtime: model.runtime, graph, prompts: [prompt] })
say(`\njob ${job.id}: ${(await job.status()).state}`)
const outcome = await job.result() // values by node id, as a local run gives them
const hidden = [...outcome.values.values()][0] as Tensor
say(`job ${job.id}: ${(await job.status()).state}; hidden state of shape [${hidden.shape}]`)

// a wrong intervention fails typed, naming your line (here caught by shape checking
// before anything is sent; an error raised inside the server's run comes back the same way)
try {
  await model.trace(prompt, (m) => {
    m.model.layers[1].mlp.output.set(Tensor.zeros([3, 5]))
    return m.lm_head.output
  }, { backend: remote })
} catch (e) {
  if (e instanceof Errors.InvalidValue) say(`\ntyped error: ${e.message}`)
  else throw e
}

say(`\nserver counters: ${JSON.stringify(await server.stats())}`)
await server.close()
await model.close()
await hosted.close()
