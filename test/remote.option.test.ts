/**
 * The `remote` option of `trace`, `generate` and `session`: the same call,
 * the same result type and values, run by a server on loopback.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { LanguageModel } from "../src/index.js"
import * as Server from "../src/remote/Server.js"

const KEY = "remote-option-test-key"
const prompt = "Once upon a time, there was a little girl named"
let client: LanguageModel
let hosted: LanguageModel
let server: Awaited<ReturnType<typeof Server.start>>
let remote: { readonly url: string; readonly apiKey: string }

beforeAll(async () => {
  client = await LanguageModel.load("models/stories260K")
  hosted = await LanguageModel.load("models/stories260K")
  server = await Server.start({ models: [{ key: "stories260K", model: hosted }], keys: [{ id: "t", key: KEY }], port: 0, coBatch: false })
  remote = { url: server.url, apiKey: KEY }
}, 60_000)

afterAll(async () => {
  await server?.close()
  await client?.close()
  await hosted?.close()
})

describe("the remote option", () => {
  it("trace: a patch gives the same logits remotely as locally", async () => {
    const fn = (m: any, t: any) => {
      const src = t.invoke("Once upon a time, there was a little boy named", () => m.model.layers[2].output.at(":", -1))
      return t.invoke(prompt, () => {
        m.model.layers[2].output.setAt([":", -1], src)
        return { logits: m.lm_head.output.at(0, -1) }
      })
    }
    const local = await client.trace(fn)
    const far = await client.trace(fn, { remote })
    expect(far.logits.allClose(local.logits, 1e-6, 1e-6)).toBe(true)
  })

  it("generate: per-step steering gives the same tokens remotely", async () => {
    const fn = (m: any, t: any) => {
      t.all(() => m.model.layers[3].mlp.output.set(0))
      return m.generator.output
    }
    const local = await client.generate(prompt, { maxNewTokens: 5 }, fn)
    const far = await client.generate(prompt, { maxNewTokens: 5, remote }, fn)
    expect(far.toNumbers()).toEqual(local.toNumbers())
  })

  it("session: a loop and a trace give the same values remotely", async () => {
    const fn = (s: any) => {
      const acc = s.list()
      s.iter([0, 1, 2, 3], (i: any) => s.cond(i.mod(2).eq(0), () => acc.append(i)))
      const h = s.trace(prompt, (m: any) => m.model.layers[1].output)
      return { acc, h }
    }
    const local = await client.session(fn)
    const far = await client.session(fn, { remote })
    expect(far.acc).toEqual([0, 2])
    expect(far.acc).toEqual(local.acc)
    expect(far.h.allClose(local.h, 1e-6, 1e-6)).toBe(true)
  })
})
