//! Profiles in PostgreSQL (`migrations/postgres/0001_profiles.sql`).

use async_trait::async_trait;
use sqlx::PgPool;

use super::{Profile, ProfilePatch, ProfileStore};
use crate::db::{PgDb, retry_once};
use crate::error::ApiError;
use crate::time::{Millis, now_millis};

/// The PostgreSQL profile store.
#[derive(Debug, Clone)]
pub struct PgProfiles {
    db: PgDb,
}

impl PgProfiles {
    /// Profiles on `db` (every call answers 503 until its migrations have run).
    pub fn new(db: PgDb) -> Self {
        Self { db }
    }
}

type Row = (String, Option<String>, Option<String>, Millis, Millis);

fn profile((openid, nickname, avatar_url, created_at, updated_at): Row) -> Profile {
    Profile {
        openid,
        nickname,
        avatar_url,
        created_at,
        updated_at,
    }
}

const SELECT: &str = "SELECT openid, nickname, avatar_url, created_at, updated_at \
                      FROM profiles WHERE openid = $1";

async fn get_or_create(pool: &PgPool, openid: &str) -> Result<Row, sqlx::Error> {
    // Reading first keeps the common case (the profile exists) a plain read: no row lock,
    // no new row version per GET /v1/me.
    if let Some(row) = sqlx::query_as(SELECT)
        .bind(openid)
        .fetch_optional(pool)
        .await?
    {
        return Ok(row);
    }
    let now = now_millis();
    let made: Option<Row> = sqlx::query_as(
        "INSERT INTO profiles (openid, created_at, updated_at) VALUES ($1, $2, $2) \
         ON CONFLICT (openid) DO NOTHING \
         RETURNING openid, nickname, avatar_url, created_at, updated_at",
    )
    .bind(openid)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    match made {
        Some(row) => Ok(row),
        // A concurrent first sight won; this new statement's snapshot sees its row.
        None => sqlx::query_as(SELECT).bind(openid).fetch_one(pool).await,
    }
}

async fn update(pool: &PgPool, openid: &str, patch: &ProfilePatch) -> Result<Row, sqlx::Error> {
    get_or_create(pool, openid).await?;
    let nickname = patch
        .nickname
        .as_ref()
        .map(|n| n.as_ref().map(|n| n.as_str()));
    let avatar_url = patch
        .avatar_url
        .as_ref()
        .map(|a| a.as_ref().map(|a| a.as_str()));
    // One statement: each field is changed only when the patch names it, so two concurrent
    // changes of different fields both stick.
    sqlx::query_as(
        "UPDATE profiles SET \
         nickname = CASE WHEN $2 THEN $3 ELSE nickname END, \
         avatar_url = CASE WHEN $4 THEN $5 ELSE avatar_url END, \
         updated_at = $6 \
         WHERE openid = $1 \
         RETURNING openid, nickname, avatar_url, created_at, updated_at",
    )
    .bind(openid)
    .bind(nickname.is_some())
    .bind(nickname.flatten())
    .bind(avatar_url.is_some())
    .bind(avatar_url.flatten())
    .bind(now_millis())
    .fetch_one(pool)
    .await
}

#[async_trait]
impl ProfileStore for PgProfiles {
    async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError> {
        let pool = self.db.ready_pool()?;
        retry_once(|| get_or_create(pool, openid))
            .await
            .map(profile)
    }

    async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError> {
        let pool = self.db.ready_pool()?;
        retry_once(|| update(pool, openid, &patch))
            .await
            .map(profile)
    }
}
