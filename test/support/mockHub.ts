/**
 * A mock Hugging Face hub on loopback, for the hub loader's tests. It answers
 * `/<repo>/resolve/<revision>/<path>` like the hub does: small files directly
 * (with a git-sha1 ETag), LFS files (`.onnx`, `.onnx_data`) by a 302 to a
 * second "CDN" server with `X-Linked-Etag` (their sha256) and `X-Linked-Size`;
 * HEAD, `Range: bytes=N-` (206 / 416), `X-Error-Code` on 401/403/404, gated
 * repos that need a Bearer token, one file whose transfer breaks off once,
 * one that serves corrupted bytes, and one that never answers.
 */
import { createHash } from "node:crypto"
import * as http from "node:http"
import type { AddressInfo } from "node:net"

export interface RepoSpec {
  readonly files: ReadonlyMap<string, Uint8Array>
  /** A token the repo needs (gated). */
  readonly token?: string
  /** LFS paths whose bytes the CDN corrupts (same length, same announced sha256). */
  readonly corrupt?: ReadonlySet<string>
  /** LFS paths whose transfer the CDN breaks off (half the body, then a reset) while `dropsLeft > 0`. */
  readonly flaky?: ReadonlySet<string>
  /** Answer nothing (to test timeouts). */
  readonly stall?: boolean
  /** Answer 404s without `X-Error-Code`. */
  readonly plain404?: boolean
}

export interface Logged {
  readonly server: "hub" | "cdn"
  readonly method: string
  readonly url: string
  readonly authorization: string | undefined
  readonly range: string | undefined
  status: number
}

export interface MockHub {
  readonly endpoint: string
  readonly log: Array<Logged>
  /** How many more transfers of flaky files break off. */
  dropsLeft: number
  readonly close: () => Promise<void>
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex")
const gitSha1 = (b: Uint8Array) => createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex")
const isLfs = (p: string) => /\.onnx(_data(_\d+)?)?$/.test(p)

const listen = (server: http.Server): Promise<number> =>
  new Promise((resolve, reject) => {
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port))
  })

/** Serves bytes with HEAD and `Range: bytes=N-` support. */
const serveBytes = (req: http.IncomingMessage, res: http.ServerResponse, bytes: Uint8Array, headers: Record<string, string>, entry: Logged, breakOff: boolean) => {
  const size = bytes.length
  const range = req.headers.range
  let start = 0
  if (range !== undefined) {
    const m = /^bytes=(\d+)-$/.exec(range)
    if (m === null) {
      entry.status = 400
      res.writeHead(400).end()
      return
    }
    start = Number(m[1])
    if (start >= size) {
      entry.status = 416
      res.writeHead(416, { ...headers, "content-range": `bytes */${size}` }).end()
      return
    }
  }
  const body = bytes.subarray(start)
  const h: Record<string, string> = { ...headers, "accept-ranges": "bytes", "content-length": String(body.length), "content-type": "application/octet-stream" }
  if (range !== undefined) h["content-range"] = `bytes ${start}-${size - 1}/${size}`
  entry.status = range !== undefined ? 206 : 200
  res.writeHead(entry.status, h)
  if (req.method === "HEAD") {
    res.end()
    return
  }
  if (breakOff && body.length > 1) {
    res.write(Buffer.from(body.subarray(0, Math.floor(body.length / 2))), () => {
      req.socket.end()
    })
    return
  }
  res.end(Buffer.from(body))
}

/**
 * Starts the hub and its CDN on 127.0.0.1 (random ports).
 */
export const startMockHub = async (repos: ReadonlyMap<string, RepoSpec>): Promise<MockHub> => {
  const log: Array<Logged> = []
  const state = { dropsLeft: 0 }
  let cdnBase = ""

  const cdn = http.createServer((req, res) => {
    const entry: Logged = { server: "cdn", method: req.method ?? "", url: req.url ?? "", authorization: req.headers.authorization, range: req.headers.range, status: 0 }
    log.push(entry)
    // /lfs/<repo...>/<revision>/<path...>, encoded as one query parameter
    const u = new URL(req.url ?? "/", "http://cdn")
    const repoId = u.searchParams.get("repo") ?? ""
    const file = u.searchParams.get("path") ?? ""
    const repo = repos.get(repoId)
    const bytes = repo?.files.get(file)
    if (repo === undefined || bytes === undefined) {
      entry.status = 404
      res.writeHead(404).end()
      return
    }
    let served = bytes
    if (repo.corrupt?.has(file)) {
      served = Uint8Array.from(bytes)
      served[Math.floor(served.length / 2)] ^= 0xff
    }
    const breakOff = repo.flaky?.has(file) === true && req.method === "GET" && state.dropsLeft > 0
    if (breakOff) state.dropsLeft--
    serveBytes(req, res, served, { etag: `"${sha256(bytes)}"` }, entry, breakOff)
  })

  const hub = http.createServer((req, res) => {
    const entry: Logged = { server: "hub", method: req.method ?? "", url: req.url ?? "", authorization: req.headers.authorization, range: req.headers.range, status: 0 }
    log.push(entry)
    const fail = (status: number, code: string | undefined, message: string) => {
      entry.status = status
      const headers: Record<string, string> = { "x-error-message": message, "content-type": "text/plain" }
      if (code !== undefined) headers["x-error-code"] = code
      res.writeHead(status, headers).end(req.method === "HEAD" ? undefined : message)
    }
    const url = new URL(req.url ?? "/", "http://hub")
    const m = /^\/(.+?)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname)
    if (m === null) return fail(404, undefined, "not a resolve URL")
    const repoId = m[1]
    const revision = decodeURIComponent(m[2])
    const file = m[3].split("/").map(decodeURIComponent).join("/")
    const repo = repos.get(repoId)
    if (repo === undefined) return fail(404, repoId.startsWith("plain/") ? undefined : "RepoNotFound", "Repository not found")
    if (repo.stall) return // never answers; closed by close()
    if (repo.token !== undefined) {
      const auth = req.headers.authorization
      if (auth === undefined) return fail(401, "GatedRepo", `Access to model ${repoId} is restricted. You must be authenticated to access it.`)
      if (auth !== `Bearer ${repo.token}`) return fail(403, "GatedRepo", `Access to model ${repoId} is restricted and you are not in the authorized list.`)
    }
    if (revision !== "main") return fail(404, "RevisionNotFound", `Invalid rev id: ${revision}`)
    const bytes = repo.files.get(file)
    if (bytes === undefined) return fail(404, repo.plain404 ? undefined : "EntryNotFound", `Entry not found`)
    if (isLfs(file)) {
      entry.status = 302
      const q = new URLSearchParams({ repo: repoId, path: file })
      res
        .writeHead(302, {
          location: `${cdnBase}/lfs?${q.toString()}`,
          "x-linked-etag": `"${sha256(bytes)}"`,
          "x-linked-size": String(bytes.length),
          "x-repo-commit": "0123456789abcdef0123456789abcdef01234567"
        })
        .end()
      return
    }
    serveBytes(req, res, bytes, { etag: `"${gitSha1(bytes)}"` }, entry, false)
  })

  const cdnPort = await listen(cdn)
  cdnBase = `http://127.0.0.1:${cdnPort}`
  const hubPort = await listen(hub)
  const close = async () => {
    for (const s of [hub, cdn]) {
      s.closeAllConnections()
      await new Promise<void>((resolve) => s.close(() => resolve()))
    }
  }
  return {
    endpoint: `http://127.0.0.1:${hubPort}`,
    log,
    get dropsLeft() {
      return state.dropsLeft
    },
    set dropsLeft(n: number) {
      state.dropsLeft = n
    },
    close
  }
}
