"""A small module to try offpilot on: `offpilot complete examples/sample.py:14:5`."""


def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


def is_prime(n: int) -> bool:
    """Return True when n is a prime number."""
    
    


if __name__ == "__main__":
    print(fibonacci(10))
    print([p for p in range(30) if is_prime(p)])
