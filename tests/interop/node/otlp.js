#!/usr/bin/env node
'use strict';
/*
 * Sends GenAI spans with the OpenTelemetry JavaScript SDK to an OTLP/HTTP receiver:
 * one chat span (with token ids), one reward span and one unrelated span, in one trace.
 *
 *   node otlp.js <tracesUrl> <proto|json> <rolloutId>
 *
 * proto: @opentelemetry/exporter-trace-otlp-proto (binary protobuf).
 * json:  spans serialized by @opentelemetry/otlp-transformer's JsonTraceSerializer (the
 *        OTLP JSON mapping the JS JSON exporter sends), POSTed as application/json.
 * Prints the HTTP status (json) or "ok"; exit 0 on success, 1 on error, 2 on usage.
 */
const { BasicTracerProvider, SimpleSpanProcessor, InMemorySpanExporter } = require('@opentelemetry/sdk-trace-base');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
const { JsonTraceSerializer } = require('@opentelemetry/otlp-transformer');
const { context, trace } = require('@opentelemetry/api');

const [url, mode, rolloutId] = process.argv.slice(2);
if (!url || !['proto', 'json'].includes(mode) || !rolloutId) {
  process.stderr.write('usage: node otlp.js <tracesUrl> <proto|json> <rolloutId>\n');
  process.exit(2);
}

async function main() {
  const memory = new InMemorySpanExporter();
  const exporter = mode === 'proto' ? new OTLPTraceExporter({ url }) : memory;
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ 'service.name': 'node-agent', 'rollstream.rollout_id': rolloutId }),
    spanProcessors: [new SimpleSpanProcessor(exporter)],
  });
  const tracer = provider.getTracer('node-agent');
  const root = tracer.startSpan('invoke_agent');
  const ctx = trace.setSpan(context.active(), root);
  const chat = tracer.startSpan('chat tiny', { attributes: {
    'gen_ai.operation.name': 'chat',
    'gen_ai.request.model': 'tiny',
    'gen_ai.response.id': `node-${mode}`,
    'gen_ai.usage.input_tokens': 4,
    'gen_ai.usage.output_tokens': 2,
    'gen_ai.response.finish_reasons': ['stop'],
    'gen_ai.input.messages': JSON.stringify([{ role: 'user', parts: [{ type: 'text', content: 'hi from node' }] }]),
    'gen_ai.output.messages': JSON.stringify([{ role: 'assistant', finish_reason: 'stop',
      parts: [{ type: 'text', content: 'hello' }] }]),
    'rollstream.prompt_token_ids': [11, 12, 13, 14],
    'rollstream.response_token_ids': [21, 22],
    'rollstream.response_logprobs': [-0.25, -1.5],
  } }, ctx);
  chat.end();
  const reward = tracer.startSpan('rollstream.reward', { attributes: {
    'rollstream.reward.value': 0.5, 'rollstream.reward.terminal': true,
    'rollstream.reward.call_id': `node-${mode}`,
  } }, ctx);
  reward.end();
  root.end();
  await provider.forceFlush();
  if (mode === 'json') {
    const body = JsonTraceSerializer.serializeRequest(memory.getFinishedSpans());
    const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    process.stdout.write(`${res.status}\n`);
    if (res.status !== 200) throw new Error(`receiver answered ${res.status}: ${await res.text()}`);
  } else {
    process.stdout.write('ok\n');
  }
  await provider.shutdown();
}

main().catch((e) => { process.stderr.write(`otlp.js: ${e && e.stack || e}\n`); process.exit(1); });
