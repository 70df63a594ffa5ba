/**
 * The published package works on its own: build, `npm pack`, install the
 * tarball into an empty project (dependencies from the npm registry or the
 * local cache), import it by name, and predict with the embedded model.
 */
import { afterAll, describe, expect, it } from "vitest"
import { execFile } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"

const run = promisify(execFile)
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
const npm = process.platform === "win32" ? "npm.cmd" : "npm"
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "nnsight-ts-pack-"))
// the build this test makes goes when it ends: bin/nnsight-ts.mjs prefers dist/ to src/,
// so a leftover build would shadow every later edit of a checkout that never built itself
const dist = path.join(root, "dist")
const builtBefore = fs.existsSync(dist)

afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true })
  if (!builtBefore) fs.rmSync(dist, { recursive: true, force: true })
})

const sh = async (cmd: string, args: ReadonlyArray<string>, cwd: string, timeout = 180_000) => {
  try {
    return await run(cmd, [...args], { cwd, timeout, maxBuffer: 64 * 1024 * 1024, env: { ...process.env, NO_COLOR: "1" } })
  } catch (e) {
    const err = e as { stdout?: string; stderr?: string; message: string }
    throw new Error(`${cmd} ${args.join(" ")} failed in ${cwd}: ${err.message}\n${err.stdout ?? ""}\n${err.stderr ?? ""}`)
  }
}

const consumer = `
import { NNsight, LanguageModel, Tensor, defaultModelDir } from "nnsight-ts"
const model = await LanguageModel.load(defaultModelDir)
const prompt = "Once upon a time, there was a little girl named"
const { logits } = await model.trace(prompt, (m) => ({ logits: m.lm_head.output }))
const id = logits.at(0, -1).argmax()
console.log(JSON.stringify({
  id,
  token: model.tokenizer.token(id),
  NNsight: typeof NNsight.load,
  tensor: Tensor.from([1, 2]).shape,
  modelDir: defaultModelDir
}))
await model.close()
`

const typed = `
import { NNsight, LanguageModel, Tensor, defaultModelDir } from "nnsight-ts"
const model: LanguageModel = await LanguageModel.load(defaultModelDir)
const out = await model.trace("Once", (m) => ({ logits: m.lm_head.output }))
const t: Tensor = out.logits
const n: Promise<NNsight> = NNsight.load(new Uint8Array(0))
void t; void n
`

describe("npm package", () => {
  it("packs, installs into an empty project, and predicts ' Lily'", async () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"))
    await sh(npm, ["run", "build"], root)
    const { stdout } = await sh(npm, ["pack", "--json", "--pack-destination", tmp], root)
    const [packed] = JSON.parse(stdout.slice(stdout.indexOf("["))) as Array<{ filename: string; files: Array<{ path: string }> }>
    const files = new Set(packed.files.map((f) => f.path))

    // What the package must hold: every "files" entry, every "exports"
    // target, and the embedded model; nothing of the tests or sources.
    for (const entry of pkg.files as ReadonlyArray<string>) {
      expect([...files].some((f) => f === entry || f.startsWith(entry + "/")), `"files" entry ${entry}`).toBe(true)
    }
    const targets = Object.values(pkg.exports as Record<string, string | Record<string, string>>).flatMap((v) =>
      typeof v === "string" ? [v] : Object.values(v)
    )
    for (const t of targets) expect(files.has(path.posix.normalize(t)), `export target ${t}`).toBe(true)
    for (const f of ["LICENSE", "README.md", "dist/index.js", "dist/index.d.ts", "models/stories260K/config.json", "models/stories260K/tokenizer.json", "models/stories260K/onnx/model.onnx"]) {
      expect(files.has(f), f).toBe(true)
    }
    expect([...files].filter((f) => f.startsWith("test/") || f.startsWith("src/") || f.endsWith(".tgz"))).toEqual([])

    const project = path.join(tmp, "project")
    fs.mkdirSync(project)
    fs.writeFileSync(path.join(project, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }))
    // onnxruntime-node's postinstall downloads CUDA binaries otherwise.
    fs.writeFileSync(path.join(project, ".npmrc"), "onnxruntime-node-install=skip\n")
    await sh(npm, ["install", path.join(tmp, packed.filename), "--no-audit", "--no-fund", "--prefer-offline"], project)

    fs.writeFileSync(path.join(project, "check.mjs"), consumer)
    const result = await sh(process.execPath, ["check.mjs"], project, 60_000)
    expect(result.stdout).toContain("Lily")
    const line = JSON.parse(result.stdout.trim().split("\n").pop()!)
    expect(line).toMatchObject({ id: 317, token: " Lily", NNsight: "function", tensor: [2] })
    expect(fs.realpathSync(line.modelDir)).toBe(fs.realpathSync(path.join(project, "node_modules", "nnsight-ts", "models", "stories260K")))

    // The types resolve for a TypeScript user (the repo's tsc; the project's effect).
    fs.writeFileSync(path.join(project, "check.mts"), typed)
    await sh(process.execPath, [
      path.join(root, "node_modules", "typescript", "bin", "tsc"),
      "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext", "--moduleResolution", "nodenext",
      "--skipLibCheck", "--typeRoots", path.join(root, "node_modules", "@types"), "--types", "node",
      "check.mts"
    ], project, 60_000)
  }, 240_000)
})
