/**
 * The `nnsight-ts` command line:
 *
 * - `nnsight-ts serve --model <dir | hub id | file.onnx | key=...> [--model ...] --port N`
 *   hosts models behind the remote API until interrupted. API keys come
 *   from `--keys <file>` (JSON `{ "keys": [{ "id", "hash", "limits"? }] }`)
 *   and the environment (`NNSIGHT_API_KEYS="id:key,..."`,
 *   `NNSIGHT_API_KEY_HASHES="id:hash,..."`); with none, a key is generated
 *   for the run and printed.
 * - `nnsight-ts keygen --id alice` prints a new key and its key-file entry.
 *
 * @example
 * npx nnsight-ts serve --model models/stories260K --port 8470
 *
 * @since 0.1.0
 */
import { existsSync } from "node:fs"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Console, Context, Effect, Layer, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { HttpServer } from "effect/http"
import { LanguageModel } from "../models/LanguageModel.js"
import { NNsight, type TracedModel } from "../models/NNsight.js"
import type * as Protocol from "./Protocol.js"
import * as Server from "./Server.js"

/**
 * How a `--model` value names a model: `key=source` or just `source`
 * (key: the base name of a folder or file that exists, else the hub id).
 *
 * @example
 * Cli.parseModel("tiny=models/stories260K") // { key: "tiny", source: "models/stories260K" }
 *
 * @since 0.1.0
 */
export const parseModel = (spec: string): { readonly key: string; readonly source: string } => {
  const eq = spec.indexOf("=")
  if (eq > 0) return { key: spec.slice(0, eq), source: spec.slice(eq + 1) }
  const base = path.basename(spec.replace(/[\\/]+$/, ""))
  const isPathLike = spec.startsWith(".") || spec.startsWith("/") || spec.endsWith(".onnx") || existsSync(spec)
  return { key: isPathLike ? base.replace(/\.onnx$/, "") : spec, source: spec }
}

/**
 * Loads a model: an `.onnx` file as `NNsight`, a folder or hub id as `LanguageModel`.
 *
 * @since 0.1.0
 */
export const loadModel = async (source: string): Promise<TracedModel<any>> =>
  source.endsWith(".onnx") ? NNsight.load(source) : LanguageModel.load(source)

/**
 * Reads a key file: `{ "keys": [{ "id": "alice", "hash": "scrypt$...", "limits": { ... } }] }`.
 *
 * @since 0.1.0
 */
export const readKeyFile = async (file: string): Promise<ReadonlyArray<Server.KeyEntry>> => {
  const json = JSON.parse(await fs.readFile(file, "utf8")) as { keys?: ReadonlyArray<Server.KeyEntry> }
  const keys = json.keys ?? []
  for (const k of keys) {
    if (typeof k.id !== "string" || typeof k.hash !== "string") throw new Error(`${file}: every key needs an "id" and a "hash" (see nnsight-ts keygen)`)
  }
  return keys
}

const models = Flag.String("model").pipe(
  Flag.withAlias("m"),
  Flag.withDescription("A model to host: a folder (config.json, tokenizer.json, ONNX), a hub id, an .onnx file, or key=source"),
  Flag.atLeast(1)
)

const serve = Command.make(
  "serve",
  {
    models,
    port: Flag.Int("port").pipe(Flag.withAlias("p"), Flag.withDescription("Port to listen on"), Flag.withDefault(8470)),
    host: Flag.String("host").pipe(Flag.withDescription("Interface to listen on"), Flag.withDefault("127.0.0.1")),
    keys: Flag.String("keys").pipe(Flag.withDescription("Key file (JSON, hashed keys; see keygen)"), Flag.optional),
    coBatch: Flag.Boolean("co-batch").pipe(
      Flag.withDescription("Run concurrent compatible trace requests as one batched forward pass"),
      Flag.withDefault(true)
    ),
    maxBodyMb: Flag.Int("max-body-mb").pipe(Flag.withDescription("Largest request body, MiB"), Flag.withDefault(64)),
    concurrentJobs: Flag.Int("max-jobs").pipe(Flag.withDescription("Default limit of unfinished jobs per key"), Flag.optional),
    wallTimeS: Flag.Int("max-seconds").pipe(Flag.withDescription("Default wall-time limit of one run, seconds"), Flag.optional),
    logRequests: Flag.Boolean("log-requests").pipe(Flag.withDescription("Log every HTTP request"), Flag.withDefault(false))
  },
  (flags) =>
    Effect.gen(function*() {
      const keys: Array<Server.KeyEntry | Server.PlainKey> = [...Server.keysFromEnv()]
      if (Option.isSome(flags.keys)) {
        const file = flags.keys.value
        keys.push(...(yield* Effect.promise(() => readKeyFile(file))))
      }
      if (keys.length === 0) {
        const key = Server.generateKey()
        keys.push({ id: "dev", key })
        yield* Console.log(`no API keys configured (--keys or NNSIGHT_API_KEYS): this run accepts the key\n  ${key}`)
      }
      const specs = flags.models.map(parseModel)
      const loaded = yield* Effect.acquireRelease(
        Effect.promise(async () => {
          const out: Array<{ key: string; model: TracedModel<any> }> = []
          for (const s of specs) out.push({ key: s.key, model: await loadModel(s.source) })
          return out
        }),
        (ms) => Effect.promise(() => Promise.all(ms.map((m) => m.model.close())).then(() => undefined))
      )
      const limits: Partial<Protocol.Limits> = {
        ...(Option.isSome(flags.concurrentJobs) ? { concurrentJobs: flags.concurrentJobs.value } : {}),
        ...(Option.isSome(flags.wallTimeS) ? { wallTimeMs: flags.wallTimeS.value * 1000 } : {})
      }
      const context = yield* Layer.build(
        Server.layer({
          models: loaded,
          keys,
          limits,
          port: flags.port,
          host: flags.host,
          coBatch: flags.coBatch,
          maxBodyBytes: flags.maxBodyMb * 1024 * 1024,
          logRequests: flags.logRequests
        })
      )
      const address = Context.get(context, HttpServer.HttpServer).address
      const port = address._tag === "UnixPathAddress" ? 0 : address.port
      yield* Console.log(`nnsight-ts serving ${loaded.map((m) => m.key).join(", ")} on http://${flags.host}:${port} (co-batching ${flags.coBatch ? "on" : "off"})`)
      return yield* Effect.never
    }).pipe(Effect.scoped)
).pipe(Command.withDescription("Host models for remote execution"))

const keygen = Command.make(
  "keygen",
  {
    id: Flag.String("id").pipe(Flag.withDescription("Who the key is for (owns its jobs)")),
    scheme: Flag.Literals("scheme", ["scrypt", "sha256"]).pipe(Flag.withDefault("scrypt" as const))
  },
  (flags) =>
    Effect.gen(function*() {
      const key = Server.generateKey()
      const hash = yield* Effect.promise(() => Server.hashKey(key, flags.scheme))
      yield* Console.log(`key (give it to ${flags.id}; it is not stored):\n  ${key}\nkey-file entry:\n  ${JSON.stringify({ id: flags.id, hash })}`)
    })
).pipe(Command.withDescription("Make an API key and its hashed key-file entry"))

/**
 * The `nnsight-ts` command.
 *
 * @since 0.1.0
 */
export const command = Command.make("nnsight-ts").pipe(
  Command.withDescription("nnsight for TypeScript: remote execution server"),
  Command.withSubcommands([serve, keygen])
)

/**
 * Runs the command line (arguments without `node` and the script).
 *
 * @example
 * Cli.main(process.argv.slice(2))
 *
 * @since 0.1.0
 */
export const main = (args: ReadonlyArray<string>): void =>
  Command.runWith(command, { version: "0.1.0" })(args).pipe(Effect.provide(NodeServices.layer), NodeRuntime.runMain)
