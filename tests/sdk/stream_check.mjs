// Streams a completion through pgdispatch-gateway with the official OpenAI Node SDK
// and prints what the SDK reassembled, as one JSON line on stdout:
//   {"text": "...", "chunks": N, "finish_reason": "stop", "error": null}
// An error the SDK raised (before or during the stream) is reported in "error"
// ({"status", "message", "code"}) with whatever text came before it; exit status 0.
// Usage: node stream_check.mjs --port 8080 --model m1 --prompt "hello" [--api completions]
//        [--api-key KEY] [--no-stream]
import OpenAI from 'openai';

function arg(name, fallback) {
  const i = process.argv.indexOf('--' + name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const port = arg('port', '8080');
const model = arg('model', 'demo');
const prompt = arg('prompt', 'hello');
const api = arg('api', 'chat');
const stream = !process.argv.includes('--no-stream');
const client = new OpenAI({
  baseURL: `http://127.0.0.1:${port}/v1`,
  apiKey: arg('api-key', 'sk-unused'),
  maxRetries: 0,
  timeout: 60000,
});

const out = { text: '', chunks: 0, finish_reason: null, error: null };
try {
  if (api === 'chat') {
    const params = { model, messages: [{ role: 'user', content: prompt }] };
    if (stream) {
      const s = await client.chat.completions.create({ ...params, stream: true });
      for await (const chunk of s) {
        out.chunks++;
        for (const c of chunk.choices ?? []) {
          out.text += c.delta?.content ?? '';
          if (c.finish_reason) out.finish_reason = c.finish_reason;
        }
      }
    } else {
      const r = await client.chat.completions.create(params);
      out.text = r.choices[0].message.content;
      out.finish_reason = r.choices[0].finish_reason;
    }
  } else {
    const params = { model, prompt };
    if (stream) {
      const s = await client.completions.create({ ...params, stream: true });
      for await (const chunk of s) {
        out.chunks++;
        for (const c of chunk.choices ?? []) {
          out.text += c.text ?? '';
          if (c.finish_reason) out.finish_reason = c.finish_reason;
        }
      }
    } else {
      const r = await client.completions.create(params);
      out.text = r.choices[0].text;
      out.finish_reason = r.choices[0].finish_reason;
    }
  }
} catch (e) {
  out.error = { status: e.status ?? null, message: String(e.message ?? e), code: e.code ?? null };
}
process.stdout.write(JSON.stringify(out) + '\n');
