-- pgjournal schema, part 21: a rate take is taken again for every new call of
-- the step it pays for.
--
-- A `rate=` step journals its take at the position before the step, and a
-- replay reuses it (no second debit, no second wait). But a step retried in
-- process (`retries=`), or a failed step executed again by a new attempt of
-- its run, calls the model again: before this migration that call took no
-- units (a step failing twice and retried called the model three times for one
-- take: the bucket's figures no longer reflected the calls, and a retry storm
-- after a 429 was not paced at all).
--
-- take_units gains `p_again`: true takes the units again for the entry that is
-- already journaled at p_position (same bucket), instead of inserting one. The
-- entry keeps its position, name, turn and calls_before (a replay asks for it
-- exactly as before); its output becomes the last take's
-- {"bucket", "units", "ready_at"} plus "earlier": every earlier take under it,
-- [{"ready_at", "units"}, ...] in order (a DBA summing units from the journal,
-- or checking windows, counts them); tries counts the takes; attempt and
-- lease_epoch are the last taker's (the Python decides from the attempt
-- whether a new attempt already took again). A step executed again after a
-- crash, with nothing journaled after its take, reuses the take: whether the
-- dead worker called the model is unknown, and a run resumed after waiting
-- for its units must not be charged twice.
--
-- The old signature is dropped (an overload with one more defaulted
-- parameter would make 10-argument calls ambiguous); IF EXISTS lets the file
-- run twice. Everything else is as in 0011.

DROP FUNCTION IF EXISTS take_units(uuid, bigint, integer, text, integer, text,
                                   double precision, integer, integer, integer);

CREATE OR REPLACE FUNCTION take_units(
    p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_bucket text, p_units double precision, p_attempt integer,
    p_turn integer DEFAULT NULL, p_calls_before integer DEFAULT NULL,
    p_again boolean DEFAULT false)
RETURNS TABLE (outcome text, ready_at timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_b rate_buckets%ROWTYPE;
    v_now_tokens double precision;
    v_ready timestamptz;
    v_t timestamptz;
BEGIN
    v_lost := check_lease(p_run, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN QUERY SELECT 'lost:' || v_lost, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT * INTO v_b FROM rate_buckets WHERE name = p_bucket FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no rate bucket named %: create it with set_rate_limit(%, capacity, '
            'refill_per_second) or `pgjournal limits rate`', p_bucket, quote_literal(p_bucket)
            USING ERRCODE = 'PJ404';
    END IF;
    -- The bucket's clock never goes back: now() is when this transaction
    -- started, and a take that started earlier may have locked the bucket
    -- first and moved it on. Reckoning from the later of the two keeps every
    -- ready_at where the refill really pays the debt back.
    v_t := greatest(now(), v_b.updated_at);
    v_now_tokens := least(v_b.capacity, v_b.tokens + extract(
        epoch FROM v_t - v_b.updated_at) * v_b.refill_per_second);
    v_now_tokens := least(v_b.capacity, v_now_tokens - p_units);
    v_ready := v_t + make_interval(secs => greatest(0, -v_now_tokens) / v_b.refill_per_second);
    IF p_units < 0 THEN
        v_ready := now();
    END IF;
    UPDATE rate_buckets SET tokens = v_now_tokens, updated_at = v_t WHERE name = p_bucket;
    IF p_again THEN
        UPDATE steps s SET
            output = json_build_object(
                'bucket', p_bucket, 'units', p_units, 'ready_at', v_ready,
                'earlier', (coalesce(s.output::jsonb -> 'earlier', '[]'::jsonb)
                            || jsonb_build_array(jsonb_build_object(
                                   'units', s.output::jsonb -> 'units',
                                   'ready_at', s.output::jsonb -> 'ready_at')))::json),
            tries = s.tries + 1, attempt = p_attempt, lease_epoch = p_epoch,
            finished_at = now(), updated_at = now()
        WHERE s.run_id = p_run AND s.run_created_at = run_bucket(p_run)
          AND s.position = p_position AND s.kind = 'rate' AND s.name = p_name
          AND s.output::jsonb ->> 'bucket' = p_bucket;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'run % has no take from bucket % at position % to take again',
                p_run, p_bucket, p_position USING ERRCODE = 'PJ404';
        END IF;
    ELSE
        INSERT INTO steps (run_created_at, run_id, position, name, occurrence, kind, status,
                           output, attempt, lease_epoch, turn, calls_before)
        VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, 'rate',
                'completed',
                json_build_object('bucket', p_bucket, 'units', p_units, 'ready_at', v_ready),
                p_attempt, p_epoch, p_turn, p_calls_before);
    END IF;
    RETURN QUERY SELECT 'taken'::text, v_ready;
END $$;
