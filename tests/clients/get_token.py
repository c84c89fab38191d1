"""Ask for a token the way a legacy workload does: the official azure-identity SDK's
ManagedIdentityCredential against IMDS (169.254.169.254), with no environment configuration.

usage: get_token.py SCOPE [--client-id ID | --resource-id ARM_ID]

Prints one JSON line on stdout: {"token": ..., "expires_on": ...} on success, or
{"error": <exception class>, "message": <text>} with exit status 1. The end-to-end suites
parse this line; the token goes to the test process only, never to a log.
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
    args = parser.parse_args()

    # A leftover variable from the caller's environment would send the SDK elsewhere.
    for name in list(os.environ):
        if name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            del os.environ[name]

    from azure.identity import ManagedIdentityCredential

    kwargs = {}
    if args.client_id:
        kwargs["client_id"] = args.client_id
    if args.resource_id:
        kwargs["identity_config"] = {"resource_id": args.resource_id}
    try:
        credential = ManagedIdentityCredential(**kwargs)
        token = credential.get_token(args.scope)
    except Exception as err:  # the suite asserts on the class and the message
        print(json.dumps({"error": type(err).__name__, "message": str(err)}))
        return 1
    print(json.dumps({"token": token.token, "expires_on": token.expires_on}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
