// The official `openai` npm package against dcml gateway: one answer and one stream, printed as JSON.
// Usage: node gateway_client.mjs <base url> <model>
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });

const { data: answer, response } = await client.chat.completions
  .create({ model, messages: [{ role: "user", content: "hello from node" }], max_tokens: 6 })
  .withResponse();

let text = "";
let receipt = null;
const stream = await client.completions.create({ model, prompt: "stream to node", max_tokens: 9, stream: true });
for await (const chunk of stream) {
  if (chunk.choices?.length) text += chunk.choices[0].text ?? "";
  if (chunk.dcml_receipt) receipt = chunk.dcml_receipt;
}

console.log(JSON.stringify({
  answer: answer.choices[0].message.content,
  usage: answer.usage,
  receiptHeader: response.headers.get("x-dcml-receipt"),
  streamedText: text,
  streamedReceipt: receipt,
}));
