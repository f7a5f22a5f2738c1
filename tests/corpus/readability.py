"""Realistic reasoning traces (English and Chinese) for the readability filters and their calibration.

CLEAN_* are written in the style of R1-distill math/code reasoning; the others are the failure
modes R1 filtered. Used by tests/test_readability.py and by the calibration numbers in
pipeline/filter/readability.py.
"""

CLEAN_EN = [
    """Okay, so I need to find the sum of all positive divisors of 36. Let me start by factoring 36.

36 = 2^2 \\cdot 3^2. The sum of divisors function is multiplicative, so $\\sigma(36) = \\sigma(2^2)\\sigma(3^2)$.

For a prime power $p^k$, $\\sigma(p^k) = 1 + p + \\dots + p^k$. So $\\sigma(4) = 1 + 2 + 4 = 7$ and $\\sigma(9) = 1 + 3 + 9 = 13$.

Therefore $\\sigma(36) = 7 \\cdot 13 = 91$. Wait, let me double-check by listing the divisors: 1, 2, 3, 4, 6, 9, 12, 18, 36. Adding them: 1 + 2 = 3, 3 + 3 = 6, 6 + 4 = 10, 10 + 6 = 16, 16 + 9 = 25, 25 + 12 = 37, 37 + 18 = 55, 55 + 36 = 91. Yes, that matches.

So the answer is 91.""",
    """Let me think about this problem. We have a triangle with sides 5, 12 and 13, and we want its area.

First, check whether it is a right triangle: $5^2 + 12^2 = 25 + 144 = 169 = 13^2$. Yes, so the legs are 5 and 12.

The area of a right triangle is half the product of the legs: $\\frac{1}{2} \\cdot 5 \\cdot 12 = 30$.

Alternatively, Heron's formula: $s = \\frac{5 + 12 + 13}{2} = 15$, and the area is $\\sqrt{15 \\cdot 10 \\cdot 3 \\cdot 2} = \\sqrt{900} = 30$. Same answer, good.

Hmm, is there anything tricky here? The problem says "the triangle", so there is only one. The area is 30.""",
    """We need the number of integers $n$ with $1 \\le n \\le 100$ such that $n^2 + n$ is divisible by 6.

Note that $n^2 + n = n(n+1)$ is always even, since one of two consecutive integers is even. So we only need divisibility by 3.

$n(n+1) \\equiv 0 \\pmod 3$ exactly when $n \\equiv 0$ or $n \\equiv 2 \\pmod 3$. Let me count. Multiples of 3 up to 100: $\\lfloor 100/3 \\rfloor = 33$. Numbers $\\equiv 2 \\pmod 3$: 2, 5, ..., 98, that is $(98 - 2)/3 + 1 = 33$.

Total: 33 + 33 = 66. Let me sanity check with small cases: n = 1 gives 2, not divisible by 6; n = 2 gives 6, yes; n = 3 gives 12, yes; n = 4 gives 20, no. So two out of every three, and 66 out of 100 is about right.""",
]

CLEAN_ZH = [
    """好的，我需要求36的所有正因数之和。首先把36分解质因数。

36 = 2^2 \\cdot 3^2。因数和函数是积性函数，所以 $\\sigma(36) = \\sigma(2^2)\\sigma(3^2)$。

对于素数幂 $p^k$，有 $\\sigma(p^k) = 1 + p + \\dots + p^k$。所以 $\\sigma(4) = 7$，$\\sigma(9) = 13$。

因此 $\\sigma(36) = 7 \\cdot 13 = 91$。等一下，我再逐个列出因数验证一下：1, 2, 3, 4, 6, 9, 12, 18, 36，加起来正好是 91。没问题。

所以答案是 91。""",
    """我们来看这道题。三角形三边分别是 5、12 和 13，要求它的面积。

先判断是不是直角三角形：$5^2 + 12^2 = 169 = 13^2$，所以是直角三角形，两条直角边是 5 和 12。

直角三角形的面积等于两直角边乘积的一半：$\\frac{1}{2} \\cdot 5 \\cdot 12 = 30$。

也可以用海伦公式检验：$s = 15$，面积为 $\\sqrt{15 \\cdot 10 \\cdot 3 \\cdot 2} = 30$。结果一致，所以面积是 30。""",
    """题目要求 1 到 100 之间满足 $n^2 + n$ 能被 6 整除的整数 n 的个数。

注意 $n^2 + n = n(n+1)$ 是两个连续整数的乘积，一定是偶数，所以只需要考虑能否被 3 整除。这里用到模运算（modulo）的思路。

当 $n \\equiv 0$ 或 $n \\equiv 2 \\pmod 3$ 时满足条件。3 的倍数有 33 个，模 3 余 2 的数也有 33 个。

总共 66 个。用小的例子验证：n = 2 时 6 能被 6 整除，n = 3 时 12 也可以，n = 4 时 20 不行，符合三个里面有两个的规律。""",
]

MIXED = [
    # English reasoning that switches into Chinese mid-way (the R1-Zero failure R1 filtered).
    """Okay, let's find the sum of the divisors of 36. First factor it: 36 = 2^2 \\cdot 3^2.

然后我们用因数和公式，对每个素数幂分别求和，1 加 2 加 4 等于 7，1 加 3 加 9 等于 13，最后把它们相乘得到结果，所以答案应该是九十一，我再检查一遍确认没有问题。""",
    # Chinese prompt, reasoning drifting into English.
    """首先分解质因数。Then the sum of divisors function is multiplicative, so we can compute each prime power separately and multiply the results together, which gives seven times thirteen, ninety one.""",
]

LOOPS = [
    "Let me compute 2 + 3. " + "Wait, let me re-check the calculation. " * 60,
    """We need x such that x^2 = 2.\n\n""" + ("Hmm, maybe I should try another approach. Let me consider the equation again: x^2 = 2, so x is the square root of 2.\n\n" * 25),
    "我们来计算。" + "等一下，我再检查一遍这个结果是否正确。" * 80,
]

LONG_PARAGRAPH_EN = " ".join(
    ["We consider the function and note that its derivative changes sign at the critical point, which means"] * 40
)

CODE_REASONING = """To count the primes below 100 I could write a quick program:

```python
print(sum(all(n % d for d in range(2, n)) for n in range(2, 100)))
```

which gives 25. So there are 25 primes below 100."""
