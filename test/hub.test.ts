import * as fs from "node:fs/promises"
import * as http from "node:http"
import type { AddressInfo } from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Cause, Effect, Exit } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import * as Hub from "../src/models/Hub.js"
import { LanguageModel } from "../src/models/LanguageModel.js"
import { type MockHub, type RepoSpec, startMockHub } from "./support/mockHub.js"

const modelDir = path.join(import.meta.dirname, "..", "models", "stories260K")
const prompt = "Once upon a time, there was a little girl named"

let hub: MockHub
let tmp: string
let files: Map<string, Uint8Array>
let onnx: Uint8Array
const savedEnv: Record<string, string | undefined> = {}
const envKeys = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "NNSIGHT_CACHE", "HF_HOME"]

let cacheCount = 0
const freshCache = () => path.join(tmp, `cache${cacheCount++}`)
const exists = (p: string) =>
  fs
    .access(p)
    .then(() => true)
    .catch(() => false)

/** Whether a file holds these bytes (a deep toEqual on a megabyte array is slow). */
const sameBytes = async (file: string, bytes: Uint8Array) => Buffer.from(bytes).equals(await fs.readFile(file))

/** Runs a download and returns its failure (the typed error), failing the test on success. */
const failure = async (repoId: string, options: Hub.Options): Promise<unknown> => {
  const exit = await Effect.runPromiseExit(Hub.download(repoId, options))
  expect(Exit.isFailure(exit)).toBe(true)
  if (Exit.isSuccess(exit)) return undefined
  return Cause.squash(exit.cause)
}

beforeAll(async () => {
  for (const k of envKeys) {
    savedEnv[k] = process.env[k]
    delete process.env[k]
  }
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), "nnsight-hub-"))
  files = new Map()
  for (const f of ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "onnx/model.onnx"]) {
    files.set(f, new Uint8Array(await fs.readFile(path.join(modelDir, f))))
  }
  onnx = files.get("onnx/model.onnx")!
  const pick = (keep: ReadonlyArray<string>, extra: ReadonlyArray<[string, Uint8Array]> = []) =>
    new Map([...[...files].filter(([k]) => keep.includes(k)), ...extra])
  const all = [...files.keys()]
  const data = new Uint8Array(4096).map((_, i) => (i * 7) % 251)
  const repos = new Map<string, RepoSpec>([
    ["test/stories", { files }],
    ["test/gated", { files, token: "hf_secret" }],
    ["test/flaky", { files, flaky: new Set(["onnx/model.onnx"]) }],
    ["test/corrupt", { files, corrupt: new Set(["onnx/model.onnx"]) }],
    ["test/stall", { files, stall: true }],
    // model.onnx at the root, no optional files, external data
    ["test/rooted", { files: pick(["config.json", "tokenizer.json"], [["model.onnx", onnx], ["model.onnx_data", data]]) }],
    ["test/no-tokenizer", { files: pick(all.filter((f) => f !== "tokenizer.json")) }],
    ["test/no-onnx", { files: pick(["config.json", "tokenizer.json"]) }],
    ["plain/no-config", { files: pick(["tokenizer.json"]), plain404: true }]
  ])
  hub = await startMockHub(repos)
})

afterAll(async () => {
  await hub?.close()
  if (tmp !== undefined) await fs.rm(tmp, { recursive: true, force: true })
  for (const k of envKeys) {
    if (savedEnv[k] === undefined) delete process.env[k]
    else process.env[k] = savedEnv[k]
  }
})

describe("Hub.download", () => {
  const storiesCache = () => path.join(tmp, "stories-cache")

  it("downloads a repository into the cache layout, and LanguageModel.load runs it", async () => {
    const before = hub.log.length
    const dir = await Hub.downloadPromise("test/stories", { endpoint: hub.endpoint, cacheDir: storiesCache(), token: "hf_public" })
    expect(dir).toBe(path.join(storiesCache(), "test", "stories", "main"))
    expect(dir).toBe(Hub.cachePath("test/stories", { cacheDir: storiesCache() }))
    for (const [f, bytes] of files) expect(await sameBytes(path.join(dir, f), bytes)).toBe(true)
    const listing = await fs.readdir(dir, { recursive: true })
    expect(listing.filter((f) => f.endsWith(".incomplete"))).toEqual([])
    const requests = hub.log.slice(before)
    // the small files, the ONNX file (hub 302 + CDN), the external-data probe (404)
    expect(requests.filter((r) => r.server === "hub").map((r) => `${r.status} ${r.url}`)).toEqual([
      "200 /test/stories/resolve/main/config.json",
      "200 /test/stories/resolve/main/generation_config.json",
      "200 /test/stories/resolve/main/tokenizer.json",
      "200 /test/stories/resolve/main/tokenizer_config.json",
      "302 /test/stories/resolve/main/onnx/model.onnx",
      "404 /test/stories/resolve/main/onnx/model.onnx_data"
    ])
    // the token goes to the hub, never to the CDN it redirects to
    expect(requests.filter((r) => r.server === "hub").every((r) => r.authorization === "Bearer hf_public")).toBe(true)
    const cdn = requests.filter((r) => r.server === "cdn")
    expect(cdn.length).toBe(1)
    expect(cdn[0].authorization).toBeUndefined()

    const model = await LanguageModel.load(dir)
    try {
      const logits = await model.trace(prompt, (m) => m.lm_head.output)
      const [, n, v] = logits.shape
      const data = logits.data as Float32Array
      let best = 0
      for (let j = 1; j < v; j++) if (data[(n - 1) * v + j] > data[(n - 1) * v + best]) best = j
      expect(best).toBe(317)
      expect(model.tokenizer.token(best)).toBe(" Lily")
    } finally {
      await model.close()
    }
  })

  it("reuses the cache without any request", async () => {
    const before = hub.log.length
    const dir = await Effect.runPromise(Hub.download("test/stories", { endpoint: hub.endpoint, cacheDir: storiesCache() }))
    expect(dir).toBe(path.join(storiesCache(), "test", "stories", "main"))
    expect(hub.log.length).toBe(before)
  })

  it("finds a root model.onnx and its external data, remembers absent optional files", async () => {
    const cacheDir = freshCache()
    const progress: Array<Hub.Progress> = []
    const dir = await Hub.downloadPromise("test/rooted", { endpoint: hub.endpoint, cacheDir, onProgress: (p) => progress.push(p) })
    expect(await sameBytes(path.join(dir, "model.onnx"), onnx)).toBe(true)
    expect((await fs.stat(path.join(dir, "model.onnx_data"))).size).toBe(4096)
    expect(await exists(path.join(dir, "generation_config.json"))).toBe(false)
    const last = progress.filter((p) => p.path === "model.onnx").at(-1)
    expect(last).toMatchObject({ repoId: "test/rooted", loaded: onnx.length, total: onnx.length })
    const before = hub.log.length
    expect(await Hub.downloadPromise("test/rooted", { endpoint: hub.endpoint, cacheDir })).toBe(dir)
    expect(hub.log.length).toBe(before)
  })

  it("resumes an .incomplete file with a Range request", async () => {
    const cacheDir = freshCache()
    const dir = Hub.cachePath("test/stories", { cacheDir })
    await fs.mkdir(path.join(dir, "onnx"), { recursive: true })
    await fs.writeFile(path.join(dir, "onnx", "model.onnx.incomplete"), onnx.subarray(0, 100_000))
    const before = hub.log.length
    await Hub.downloadPromise("test/stories", { endpoint: hub.endpoint, cacheDir })
    const cdn = hub.log.slice(before).filter((r) => r.server === "cdn")
    expect(cdn.map((r) => [r.range, r.status])).toEqual([["bytes=100000-", 206]])
    expect(await sameBytes(path.join(dir, "onnx", "model.onnx"), onnx)).toBe(true)
    expect(await exists(path.join(dir, "onnx", "model.onnx.incomplete"))).toBe(false)
  })

  it("accepts an .incomplete part that is already whole (416) after checking it", async () => {
    const cacheDir = freshCache()
    const dir = Hub.cachePath("test/stories", { cacheDir })
    await fs.mkdir(path.join(dir, "onnx"), { recursive: true })
    await fs.writeFile(path.join(dir, "onnx", "model.onnx.incomplete"), onnx)
    const before = hub.log.length
    await Hub.downloadPromise("test/stories", { endpoint: hub.endpoint, cacheDir })
    expect(hub.log.slice(before).filter((r) => r.server === "cdn").map((r) => r.status)).toEqual([416])
    expect(await sameBytes(path.join(dir, "onnx", "model.onnx"), onnx)).toBe(true)
  })

  it("resumes a transfer that broke off, in the same call", async () => {
    hub.dropsLeft = 1
    const before = hub.log.length
    const cacheDir = freshCache()
    const dir = await Hub.downloadPromise("test/flaky", { endpoint: hub.endpoint, cacheDir })
    const cdn = hub.log.slice(before).filter((r) => r.server === "cdn")
    expect(cdn.length).toBe(2)
    expect(cdn[0].range).toBeUndefined()
    expect(cdn[1].range).toMatch(/^bytes=[1-9]\d*-$/)
    expect(cdn[1].status).toBe(206)
    expect(await sameBytes(path.join(dir, "onnx", "model.onnx"), onnx)).toBe(true)
  })

  it("keeps a broken transfer as .incomplete (NetworkError) and resumes it in the next call", async () => {
    hub.dropsLeft = 1
    const cacheDir = freshCache()
    const dir = Hub.cachePath("test/flaky", { cacheDir })
    const e = await failure("test/flaky", { endpoint: hub.endpoint, cacheDir, retries: 0 })
    expect(e).toBeInstanceOf(Hub.NetworkError)
    expect((e as Hub.NetworkError).path).toBe("onnx/model.onnx")
    expect((e as Hub.NetworkError).message).toContain("test/flaky")
    const part = await fs.stat(path.join(dir, "onnx", "model.onnx.incomplete"))
    expect(part.size).toBeGreaterThan(0)
    expect(part.size).toBeLessThan(onnx.length)
    expect(await exists(path.join(dir, "onnx", "model.onnx"))).toBe(false)
    const before = hub.log.length
    await Hub.downloadPromise("test/flaky", { endpoint: hub.endpoint, cacheDir, retries: 0 })
    const cdn = hub.log.slice(before).filter((r) => r.server === "cdn")
    expect(cdn.map((r) => [r.range, r.status])).toEqual([[`bytes=${part.size}-`, 206]])
    expect(await sameBytes(path.join(dir, "onnx", "model.onnx"), onnx)).toBe(true)
  })

  it("fails with RepoNotFound for an unknown repository", async () => {
    const e = await failure("test/unknown", { endpoint: hub.endpoint, cacheDir: freshCache() })
    expect(e).toBeInstanceOf(Hub.RepoNotFound)
    expect((e as Error).message).toContain("test/unknown")
    // a 404 on config.json without the hub's error code
    const plain = await failure("plain/no-config", { endpoint: hub.endpoint, cacheDir: freshCache() })
    expect(plain).toBeInstanceOf(Hub.RepoNotFound)
    expect((plain as Error).message).toContain("config.json")
    // a revision that does not exist
    const rev = await failure("test/stories", { endpoint: hub.endpoint, cacheDir: freshCache(), revision: "v9" })
    expect(rev).toBeInstanceOf(Hub.RepoNotFound)
    expect((rev as Error).message).toContain("revision")
  })

  it("fails with FileNotFound for a missing needed file", async () => {
    const e = await failure("test/no-tokenizer", { endpoint: hub.endpoint, cacheDir: freshCache() })
    expect(e).toBeInstanceOf(Hub.FileNotFound)
    expect((e as Hub.FileNotFound).path).toBe("tokenizer.json")
    expect((e as Error).message).toContain("test/no-tokenizer")
    const none = await failure("test/no-onnx", { endpoint: hub.endpoint, cacheDir: freshCache() })
    expect(none).toBeInstanceOf(Hub.FileNotFound)
    expect((none as Error).message).toContain("onnx/model.onnx")
    const extra = await failure("test/stories", { endpoint: hub.endpoint, cacheDir: storiesCache(), files: ["README.md"] })
    expect(extra).toBeInstanceOf(Hub.FileNotFound)
  })

  it("needs a token for a gated repository", async () => {
    const cacheDir = freshCache()
    const none = await failure("test/gated", { endpoint: hub.endpoint, cacheDir })
    expect(none).toBeInstanceOf(Hub.Unauthorized)
    expect((none as Hub.Unauthorized).status).toBe(401)
    expect((none as Error).message).toContain("pass a Hugging Face token")
    expect((none as Error).message).toContain("test/gated")
    const wrong = await failure("test/gated", { endpoint: hub.endpoint, cacheDir, token: "hf_wrong" })
    expect(wrong).toBeInstanceOf(Hub.Unauthorized)
    expect((wrong as Hub.Unauthorized).tokenSent).toBe(true)
    const dir = await Hub.downloadPromise("test/gated", { endpoint: hub.endpoint, cacheDir, token: "hf_secret" })
    expect(await sameBytes(path.join(dir, "onnx", "model.onnx"), onnx)).toBe(true)
    // the token from the environment
    process.env.HF_TOKEN = "hf_secret"
    try {
      await Hub.downloadPromise("test/gated", { endpoint: hub.endpoint, cacheDir: freshCache() })
    } finally {
      delete process.env.HF_TOKEN
    }
  })

  it("fails with NetworkError when the hub cannot be reached or does not answer", async () => {
    const server = http.createServer()
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()))
    const port = (server.address() as AddressInfo).port
    await new Promise<void>((resolve) => server.close(() => resolve()))
    const refused = await failure("test/stories", { endpoint: `http://127.0.0.1:${port}`, cacheDir: freshCache() })
    expect(refused).toBeInstanceOf(Hub.NetworkError)
    expect((refused as Hub.NetworkError).url).toBe(`http://127.0.0.1:${port}/test/stories/resolve/main/config.json`)
    expect((refused as Error).message).toContain("ECONNREFUSED")
    const stalled = await failure("test/stall", { endpoint: hub.endpoint, cacheDir: freshCache(), timeoutMs: 300 })
    expect(stalled).toBeInstanceOf(Hub.NetworkError)
    expect((stalled as Error).message).toContain("timed out")
    // the Promise form rejects with the typed error itself
    await expect(Hub.downloadPromise("test/stories", { endpoint: `http://127.0.0.1:${port}`, cacheDir: freshCache() })).rejects.toBeInstanceOf(
      Hub.NetworkError
    )
  })

  it("fails with CorruptFile on a sha256 mismatch and leaves nothing in the cache", async () => {
    const cacheDir = freshCache()
    const dir = Hub.cachePath("test/corrupt", { cacheDir })
    const e = await failure("test/corrupt", { endpoint: hub.endpoint, cacheDir })
    expect(e).toBeInstanceOf(Hub.CorruptFile)
    expect((e as Hub.CorruptFile).path).toBe("onnx/model.onnx")
    expect((e as Error).message).toContain("sha256")
    expect(await exists(path.join(dir, "onnx", "model.onnx"))).toBe(false)
    expect(await exists(path.join(dir, "onnx", "model.onnx.incomplete"))).toBe(false)
    expect(await exists(path.join(dir, "config.json"))).toBe(true)
  })

  it("works offline from the cache, and fails with OfflineMissing without it", async () => {
    const before = hub.log.length
    const dir = await Hub.downloadPromise("test/stories", { endpoint: hub.endpoint, cacheDir: storiesCache(), offline: true })
    expect(dir).toBe(path.join(storiesCache(), "test", "stories", "main"))
    const cacheDir = freshCache()
    const missing = await failure("test/stories", { endpoint: hub.endpoint, cacheDir, offline: true })
    expect(missing).toBeInstanceOf(Hub.OfflineMissing)
    expect((missing as Hub.OfflineMissing).path).toBe("config.json")
    expect((missing as Error).message).toContain("test/stories")
    // a cache that has the small files but no ONNX model
    await fs.mkdir(Hub.cachePath("test/stories", { cacheDir }), { recursive: true })
    for (const f of ["config.json", "tokenizer.json"]) {
      await fs.copyFile(path.join(modelDir, f), path.join(Hub.cachePath("test/stories", { cacheDir }), f))
    }
    process.env.HF_HUB_OFFLINE = "1"
    try {
      const noOnnx = await failure("test/stories", { endpoint: hub.endpoint, cacheDir })
      expect(noOnnx).toBeInstanceOf(Hub.OfflineMissing)
      expect((noOnnx as Error).message).toContain("onnx/model.onnx")
    } finally {
      delete process.env.HF_HUB_OFFLINE
    }
    expect(hub.log.length).toBe(before)
  })

  it("rejects invalid repository ids and paths", async () => {
    for (const id of ["../etc", "a/b/c", "", "org/..", "/abs"]) {
      expect(await failure(id, { endpoint: hub.endpoint, cacheDir: freshCache() })).toBeInstanceOf(Hub.InvalidRequest)
    }
    expect(await failure("test/stories", { endpoint: hub.endpoint, cacheDir: freshCache(), files: ["../x"] })).toBeInstanceOf(Hub.InvalidRequest)
  })

  it("builds hub URLs", () => {
    expect(Hub.fileUrl("https://huggingface.co/", "org/name", "refs/pr/1", "onnx/model.onnx")).toBe(
      "https://huggingface.co/org/name/resolve/refs%2Fpr%2F1/onnx/model.onnx"
    )
  })
})
