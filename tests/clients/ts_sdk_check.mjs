// The TypeScript SDK (@anthropic-ai/sdk) against a kawai server: one streamed message, one streamed tool
// call. Prints one JSON line: {text, tool, events} for tests/e2e/test_real_clients.py to check.
// Env: KAWAI_URL, KAWAI_KEY, KAWAI_MODEL (any id: one model served answers every id).
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.KAWAI_URL, apiKey: process.env.KAWAI_KEY, maxRetries: 0 });
const model = process.env.KAWAI_MODEL;

const events = [];
const textStream = client.messages.stream({
  model,
  max_tokens: 24,
  messages: [{ role: "user", content: "Say hello in three words." }],
});
textStream.on("streamEvent", (event) => events.push(event.type));
const text = await textStream.finalMessage();

const weather = {
  name: "get_weather",
  description: "Get the current weather for a city",
  input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
};
const toolStream = client.messages.stream({
  model,
  max_tokens: 64,
  tools: [weather],
  tool_choice: { type: "tool", name: "get_weather" },
  messages: [{ role: "user", content: "What is the weather in Paris?" }],
});
const partialJson = [];
toolStream.on("inputJson", (delta) => partialJson.push(delta));
const tool = await toolStream.finalMessage();

console.log(JSON.stringify({ text, tool, events, partialJson }));
