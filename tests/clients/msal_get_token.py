"""Ask for a token the way an MSAL for Python workload does: msal's ManagedIdentityClient with
SystemAssignedManagedIdentity (no selector) or UserAssignedManagedIdentity (client id or
resource id) against IMDS (169.254.169.254), with no environment configuration and a plain
requests session as MSAL's documentation shows (MSAL leaves retries to the HTTP client).

usage: msal_get_token.py SCOPE [--client-id ID | --resource-id ARM_ID]

Prints one JSON line on stdout, the protocol of get_token.py: {"token": ..., "expires_on": ...,
"elapsed": s} on success, or {"error": <IMDS error code or exception class>, "message": <text>,
"elapsed": s} with exit status 1, where `elapsed` is the seconds acquire_token_for_client took.
"""
import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scope")
    parser.add_argument("--client-id")
    parser.add_argument("--resource-id")
    args = parser.parse_args()

    # A leftover variable from the caller's environment would send MSAL elsewhere.
    for name in list(os.environ):
        if name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            del os.environ[name]

    import msal
    import requests

    if args.client_id:
        identity = msal.UserAssignedManagedIdentity(client_id=args.client_id)
    elif args.resource_id:
        identity = msal.UserAssignedManagedIdentity(resource_id=args.resource_id)
    else:
        identity = msal.SystemAssignedManagedIdentity()
    # Managed identity takes a resource, not a scope.
    resource = args.scope[: -len("/.default")] if args.scope.endswith("/.default") else args.scope
    started = time.monotonic()
    try:
        client = msal.ManagedIdentityClient(identity, http_client=requests.Session())
        result = client.acquire_token_for_client(resource=resource)
    except Exception as err:  # the suite asserts on the class and the message
        elapsed = time.monotonic() - started
        print(json.dumps({"error": type(err).__name__, "message": str(err), "elapsed": elapsed}))
        return 1
    elapsed = time.monotonic() - started
    if "access_token" in result:
        expires_on = int(time.time()) + int(result.get("expires_in", 0))
        print(json.dumps({"token": result["access_token"], "expires_on": expires_on, "elapsed": elapsed}))
        return 0
    print(json.dumps({
        "error": result.get("error", "unknown"),
        "message": result.get("error_description", ""),
        "elapsed": elapsed,
    }))
    return 1


if __name__ == "__main__":
    sys.exit(main())
