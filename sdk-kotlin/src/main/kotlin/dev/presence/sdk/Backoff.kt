package dev.presence.sdk

import kotlin.math.min
import kotlin.math.pow
import kotlin.random.Random
import kotlin.time.Duration
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds

/**
 * How long to wait between reconnect attempts: exponential backoff with full jitter.
 *
 * Attempt `n` (counting from 1) waits a uniformly random time between zero and
 * `min(max, initial * factor^(n-1))`. Drawing the whole delay at random ("full jitter") rather than
 * adding a little noise to a fixed delay is what spreads a crowd of phones that lost the same
 * server node, instead of having them come back in lockstep.
 *
 * @property initial the ceiling of the first attempt's delay. Default: 100 ms.
 * @property max the ceiling no delay exceeds, however many attempts failed. Default: 10 s.
 * @property factor how much the ceiling grows with each failed attempt; at least 1. Default: 2.
 */
public data class Backoff(
    val initial: Duration = 100.milliseconds,
    val max: Duration = 10.seconds,
    val factor: Double = 2.0,
) {
    init {
        require(factor.isFinite() && factor >= 1.0) { "backoff factor must be a finite number >= 1, got $factor" }
        require(!initial.isNegative() && initial <= max) { "backoff initial delay must lie between zero and max" }
    }

    /** The largest delay attempt [attempt] (counting from 1) may wait; attempt 0 waits nothing. */
    public fun ceiling(attempt: Int): Duration {
        if (attempt <= 0) return Duration.ZERO
        // Past 64 doublings the product dwarfs any sane max; capping the exponent keeps it finite.
        val grown = initial.inWholeMilliseconds * factor.pow(min(attempt - 1, 64))
        return min(grown, max.inWholeMilliseconds.toDouble()).milliseconds
    }

    /** A random delay for [attempt]: uniform in `[0, ceiling(attempt)]`. */
    public fun delay(attempt: Int, random: Random = Random.Default): Duration =
        ceiling(attempt) * random.nextDouble()
}
