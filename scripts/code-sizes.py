#!/usr/bin/env python3
"""Lists source files over 700 non-test lines and functions over 80 lines (issue 19's limits).
Run from the repository root: python3 scripts/code-sizes.py"""
import re,glob,sys
files=[f for f in glob.glob('*/src/**/*.rs',recursive=True) if '/target/' not in f and not f.startswith('target')]
big=[]; longf=[]
for f in files:
    lines=open(f).read().split('\n')
    # cut at #[cfg(test)] mod tests
    end=len(lines)
    for i,l in enumerate(lines):
        if l.startswith('#[cfg(test)]'):
            end=i;break
    if end>700: big.append((end,f))
    i=0
    while i<end:
        m=re.match(r'^(\s*)(pub(\([a-z]+\))? )?(async )?(unsafe )?fn (\w+)',lines[i])
        if m and not lines[i].rstrip().endswith(';'):
            ind=m.group(1); name=m.group(6)
            j=i+1
            while j<end and not (lines[j].startswith(ind+'}') and len(lines[j])-len(lines[j].lstrip())==len(ind)):
                j+=1
            n=j-i+1
            if n>80: longf.append((n,f,name))
            i=j
        i+=1
print("files over 700 (non-test lines):")
for n,f in sorted(big,reverse=True): print(f"  {n} {f}")
print("functions over 80 lines:")
for n,f,name in sorted(longf,reverse=True): print(f"  {n} {f} {name}")
