"""Ask for a token the way a legacy workload does: the official azure-identity SDK's
ManagedIdentityCredential against IMDS (169.254.169.254), with no environment configuration.

usage: get_token.py SCOPE [--client-id ID | --resource-id ARM_ID] [--default-credential]

With --default-credential the SDK's DefaultAzureCredential asks instead (its chain: environment,
workload identity, managed identity, then developer tools), as an application that runs both in
a pod and on a laptop does.

Prints one JSON line on stdout: {"token": ..., "expires_on": ..., "elapsed": s} on success, or
{"error": <exception class>, "message": <text>, "elapsed": s} with exit status 1, where
`elapsed` is the seconds get_token took. The end-to-end suites parse this line; the token goes
to the test process only, never to a log.
"""
import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scope")
    parser.add_argument("--client-id")
    parser.add_argument("--resource-id")
    parser.add_argument("--default-credential", action="store_true")
    args = parser.parse_args()

    # A leftover variable from the caller's environment would send the SDK elsewhere.
    for name in list(os.environ):
        if name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            del os.environ[name]

    import time

    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    kwargs = {}
    if args.client_id:
        kwargs["client_id"] = args.client_id
    if args.resource_id:
        kwargs["identity_config"] = {"resource_id": args.resource_id}
    started = time.monotonic()
    try:
        if args.default_credential:
            if args.client_id:
                kwargs = {"managed_identity_client_id": args.client_id}
            credential = DefaultAzureCredential(**kwargs)
        else:
            credential = ManagedIdentityCredential(**kwargs)
        token = credential.get_token(args.scope)
    except Exception as err:  # the suite asserts on the class and the message
        elapsed = time.monotonic() - started
        print(json.dumps({"error": type(err).__name__, "message": str(err), "elapsed": elapsed}))
        return 1
    elapsed = time.monotonic() - started
    print(json.dumps({"token": token.token, "expires_on": token.expires_on, "elapsed": elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
