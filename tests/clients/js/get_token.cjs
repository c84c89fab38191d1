// Ask for a token the way a JavaScript workload does: the official @azure/identity SDK's
// ManagedIdentityCredential against IMDS (169.254.169.254), with no environment configuration.
//
// usage: node get_token.cjs SCOPE [--client-id ID | --resource-id ARM_ID] [--default-credential]
//
// With --default-credential the SDK's DefaultAzureCredential asks instead (its chain:
// environment, workload identity, managed identity, then developer tools).
//
// Prints one JSON line on stdout, the protocol of tests/clients/get_token.py:
// {"token": ..., "expires_on": ..., "elapsed": s} on success, or
// {"error": <error name>, "message": <text>, "elapsed": s} with exit status 1, where `elapsed`
// is the seconds getToken took. The SDK comes from the directory tests/scripts/install-deps.sh
// installs it into (NODE_PATH, set by the end-to-end harness).
"use strict";

function parse(argv) {
  const args = { scope: undefined, clientId: undefined, resourceId: undefined, defaultCredential: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--client-id") args.clientId = argv[++i];
    else if (arg === "--resource-id") args.resourceId = argv[++i];
    else if (arg === "--default-credential") args.defaultCredential = true;
    else if (args.scope === undefined) args.scope = arg;
    else throw new Error(`unexpected argument ${arg}`);
  }
  if (!args.scope) throw new Error("usage: get_token.cjs SCOPE [--client-id ID | --resource-id ID] [--default-credential]");
  return args;
}

async function main() {
  const args = parse(process.argv.slice(2));
  // A leftover variable from the caller's environment would send the SDK elsewhere.
  for (const name of Object.keys(process.env)) {
    if (/^(AZURE_|IDENTITY_|MSI_|IMDS_)/.test(name)) delete process.env[name];
  }
  const { DefaultAzureCredential, ManagedIdentityCredential } = require("@azure/identity");
  const options = {};
  if (args.clientId) options.clientId = args.clientId;
  if (args.resourceId) options.resourceId = args.resourceId;
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  try {
    const credential = args.defaultCredential
      ? new DefaultAzureCredential(args.clientId ? { managedIdentityClientId: args.clientId } : {})
      : new ManagedIdentityCredential(options);
    const token = await credential.getToken(args.scope);
    const seconds = elapsed();
    console.log(JSON.stringify({
      token: token.token,
      expires_on: Math.floor(token.expiresOnTimestamp / 1000),
      elapsed: seconds,
    }));
    return 0;
  } catch (err) {
    const seconds = elapsed();
    console.log(JSON.stringify({ error: err.name, message: String(err.message), elapsed: seconds }));
    return 1;
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
