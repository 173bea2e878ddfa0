#!/usr/bin/env python3
"""scripts/bench/s3-du.py ENDPOINT REGION BUCKET PREFIX ACCESS_KEY_ID SECRET

Prints "<bytes> <objects>": the summed size and the number of the objects under PREFIX
in BUCKET (S3 ListObjectsV2, path style, AWS SigV4, http:// endpoints only; standard
library only). Part of scripts/bench-backup (tidemark).
"""
import datetime
import hashlib
import hmac
import http.client
import sys
import urllib.parse
import xml.etree.ElementTree as ET


def q(s):
    return urllib.parse.quote(s, safe="-_.~")


def main():
    endpoint, region, bucket, prefix, key_id, secret = sys.argv[1:7]
    u = urllib.parse.urlsplit(endpoint)
    if u.scheme != "http":
        sys.exit("s3-du.py: only http:// endpoints")
    host = u.netloc
    total = count = 0
    token = None
    while True:
        params = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
        if token:
            params["continuation-token"] = token
        query = "&".join(f"{q(k)}={q(v)}" for k, v in sorted(params.items()))
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(b"").hexdigest()
        signed = "host;x-amz-content-sha256;x-amz-date"
        canonical = "\n".join(["GET", f"/{bucket}", query, f"host:{host}",
                               f"x-amz-content-sha256:{payload}", f"x-amz-date:{amz_date}",
                               "", signed, payload])
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        k = ("AWS4" + secret).encode()
        for part in (day, region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        headers = {"Host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload,
                   "Authorization": f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}"}
        c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
        c.request("GET", f"/{bucket}?{query}", headers=headers)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            sys.exit(f"s3-du.py: HTTP {r.status}: {body[:300]!r}")
        root = ET.fromstring(body)
        ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        for c_ in root.findall(f"{ns}Contents"):
            total += int(c_.find(f"{ns}Size").text)
            count += 1
        if root.findtext(f"{ns}IsTruncated") == "true":
            token = root.findtext(f"{ns}NextContinuationToken")
        else:
            break
    print(total, count)


if __name__ == "__main__":
    main()
